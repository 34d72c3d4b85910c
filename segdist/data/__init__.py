"""Shards on disk: writing (shards, shapes, convert), reading (manifest, stream), augment."""
