"""Plug-ins for voice-agent frameworks: `edgetalk.integrations.pipecat` (a Pipecat frame processor)
and `edgetalk.integrations.livekit` (a LiveKit Agents avatar video generator). Each imports its
framework, so import only the one you use (`pip install 'edgetalk[pipecat]'` / `[livekit]`)."""
