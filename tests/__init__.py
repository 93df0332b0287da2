"""EdgeTalk tests."""
