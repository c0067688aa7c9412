"""gss-runtime: run GatedDsConvLM models exported by gss-export with onnxruntime, without torch."""

from .errors import RuntimeInputError
from .runner import GSSRunner

__all__ = ["GSSRunner", "RuntimeInputError"]
