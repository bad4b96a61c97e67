"""On-disk formats: checkpoints, their metadata and strict JSON."""
