"""A stored version into a ready engine: verified streams of its files (torch, memory or disk mode)
and of its ONNX artifacts, whose records this package defines and reads.

Uses ``store`` and ``engine``; used by ``refresh`` (canaries) and ``serving``.
"""
