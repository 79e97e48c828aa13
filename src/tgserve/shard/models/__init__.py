"""Model architectures, one per file, built from shared layers."""
