"""Isolate an extractive question-answering model into Azure Blob Storage and serve it from there.

``function_app.py`` only wires triggers; the work lives in this package.
"""
