"""onnxslim: a validated graph-level optimizer for ONNX models."""

from onnxslim.api import inspect_model, optimize, validate_files
from onnxslim.errors import GateError, InputError, PassError, SlimError
from onnxslim.manager import Context, Pass, PassManager, PassResult, register

__version__ = "0.1.0"
__all__ = [
    "optimize", "inspect_model", "validate_files",
    "Pass", "PassResult", "PassManager", "Context", "register",
    "SlimError", "InputError", "GateError", "PassError",
]
