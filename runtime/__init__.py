"""EdgeTalk runtime."""
