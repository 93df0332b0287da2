"""EdgeTalk converters."""
