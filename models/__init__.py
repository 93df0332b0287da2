"""PyTorch reference modules of the EdgeTalk model family."""
