"""A LiveKit voice agent with an EdgeTalk face, rendered on this machine.

    livekit-server --dev                                  # or LiveKit Cloud: its URL and keys
    export LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
    pip install 'edgetalk[livekit]' livekit-plugins-openai && export OPENAI_API_KEY=...
    EDGETALK_AVATAR=me.jpg python examples/livekit_avatar_worker.py dev

Then join the room from the Agents Playground (https://agents-playground.livekit.io, "Custom",
your URL and a token from `lk token create --join --room test --identity me`) or any LiveKit
client. The agent joins, starts the EdgeTalk avatar worker (a child process that joins the room as
the participant "edgetalk-avatar") and talks; its voice goes to the avatar over a DataStream and
comes back from the avatar's tracks, lip-synced with the face.

STT, LLM and TTS are swappable: `models()` uses the OpenAI plug-in when it is installed, else
LiveKit Inference (LiveKit Cloud). Any other LiveKit plug-ins go the same way.
"""

from __future__ import annotations

import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, inference

from edgetalk.integrations.livekit import EdgeTalkAvatarSession

server = AgentServer()


def models() -> dict:
    try:
        from livekit.plugins import openai
    except ImportError:
        return {
            "stt": inference.STT("deepgram/nova-3"),
            "llm": inference.LLM("openai/gpt-4.1-mini"),
            "tts": inference.TTS("cartesia/sonic-3"),
        }
    return {"stt": openai.STT(), "llm": openai.LLM(), "tts": openai.TTS()}


@server.rtc_session()
async def entrypoint(ctx: JobContext):
    await ctx.connect()
    session = AgentSession(**models())
    avatar = EdgeTalkAvatarSession(
        avatar=os.environ.get("EDGETALK_AVATAR"),  # a photo; default: the embedded face
        threads=int(os.environ.get("EDGETALK_THREADS", "0")) or None,
    )
    await avatar.start(session, room=ctx.room)  # before session.start: audio goes to the avatar
    await session.start(
        agent=Agent(instructions="You are a friendly avatar. Answer in one or two sentences."),
        room=ctx.room,
    )
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(server)
