"""gss-export: export gated-state-spaces language models to ONNX and TorchScript, validated against eager PyTorch."""

__version__ = "0.1.0"

# opset 20 has Gelu: one kernel instead of five elementwise passes (about 10% of prefill time at 4096)
DEFAULT_OPSET = 20
