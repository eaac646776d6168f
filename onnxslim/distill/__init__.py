"""Distillation engine: ONNX -> torch translation, the training loop, write-back of trained values.

Needs torch (``pip install -e ".[distill]"``); nothing outside this package imports it at module level.
``passes/distill.py`` is the only caller; it turns the engine's ``DistillOutcome`` into a PassResult.
"""
