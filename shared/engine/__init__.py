"""Question answering over a context: tokenization, windows, span decoding (identical to the
transformers 4.57.6 pipeline), and the torch and ONNX Runtime runners; a model from files in memory.

Imports only the foundation: it knows nothing of storage.
"""
