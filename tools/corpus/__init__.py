"""Helpers for tools/gen-corpus.py: byte-level format helpers and the
hand-built hostile images. Python 3.11 stdlib only."""
