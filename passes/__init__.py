"""Optimization passes, one module each; installed as ``onnxslim.passes``.

Every module registers its Pass subclass with ``@onnxslim.manager.register``; the manager
imports them all. Passes never import each other: shared helpers live in ``onnxslim/``.
"""
