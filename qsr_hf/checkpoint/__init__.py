"""Checkpoints of the local state: the file format and manifest, what a rank saves, resume and elastic resume."""
