"""EdgeTalk runtime_cuda."""
