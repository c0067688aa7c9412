"""Whether onnxruntime's int8 products overflow on this CPU, and the session setting that prevents it.

onnxruntime multiplies uint8 activations by int8 weights. With VNNI the pair sums are int32; without
it (AVX2, or AVX-512 without VNNI) `vpmaddubsw` adds pairs in int16 and saturates above 32767, so
weights outside [-64, 64] can overflow. Exports ranged for AVX2 (`gss-export --int8-cpu avx2`) keep
their weights inside; for the others, `session.x64quantprecision` makes onnxruntime convert such
weights to uint8 (u8u8 products: exact, slower). It must stay off where nothing saturates: with VNNI
it converts just the same and made a 512-token prefill 2.9x slower.

Torch-free: numpy and onnxruntime only.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROBE = Path(__file__).with_name("u8s8_probe.onnx")  # y = a @ b, a uint8 (rows, 64), b int8 (64, 8) of 127s
PRECISION_KEY = "session.x64quantprecision"


@functools.cache
def u8s8_saturates() -> bool:
    """Whether onnxruntime's CPU u8 x s8 product saturates here: rows of 255 times columns of 127,
    exactly 255 * 127 * 64, or 32767 * 32 where pairs are clamped."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(PROBE), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((16, 64), 255, np.uint8)})[0]
    return bool((got != 255 * 127 * 64).any())


def guard(options: ort.SessionOptions) -> ort.SessionOptions:
    """`options`, with onnxruntime's exact u8u8 products turned on where u8s8 ones would saturate."""
    if u8s8_saturates():
        options.add_session_config_entry(PRECISION_KEY, "1")
    return options
