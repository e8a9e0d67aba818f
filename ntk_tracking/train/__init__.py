"""Training loops and the tracked-run wrapper."""
