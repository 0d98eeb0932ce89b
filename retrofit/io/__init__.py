"""Checkpoint I/O: resolving sources, reading shards lazily, writing directories atomically."""
