"""EdgeTalk training."""
