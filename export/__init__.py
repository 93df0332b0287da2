"""EdgeTalk export."""
