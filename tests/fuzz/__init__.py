"""Fuzzing: oracles shared with the property tests, and the atheris harness (outside CI)."""
