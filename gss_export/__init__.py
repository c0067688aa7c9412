"""gss-export: export gated-state-spaces language models to ONNX and TorchScript, validated against eager PyTorch."""

__version__ = "0.1.0"
