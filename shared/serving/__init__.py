"""Answering requests: the model holder (lazy load, fallback, hot reload), the HTTP handlers, the
OpenAPI document and the playground.

Uses ``loading``, ``store`` and ``engine``; never ``refresh`` (a refresh is only queued).
"""
