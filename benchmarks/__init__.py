"""EdgeTalk benchmarks."""
