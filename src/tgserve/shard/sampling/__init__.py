"""Per-request sampling and stopping as pure tensor functions."""
