"""Blob and Queue storage of isolated versions: clients and transfers, the version's files and
manifest, the pointer, the versioned store itself, and the refresh queue's message.

Imports only the foundation (``shared.settings``, ``shared.errors``...): it knows nothing of models.
"""
