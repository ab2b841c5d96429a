"""Making versions: the Hub and local-folder sources, isolation into the store, ONNX export and int8
quantization of serving artifacts, and the refresh worker.

Uses ``loading``, ``store`` and ``engine``; never ``serving``.
"""
