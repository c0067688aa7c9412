"""What every torch.export-based target traces for forward: example inputs and symbolic axes (the
decoder's are in `decoder_io.py`), and a quiet context for the exporters.

Shared by the ONNX export and the torch.export targets (pt2, aoti), so all of them agree on which
axes are dynamic and on their bounds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

MAX_BATCH = 1 << 20
# the ONNX exporter, torch.export and inductor log, warn and print about things that are fine here
TRACING_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch._inductor", "torch.fx")


@contextlib.contextmanager
def quiet_tracing():
    """Silence the exporters' own progress and warnings: the library reports through return values."""
    loggers = [logging.getLogger(name) for name in TRACING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def forward_signature(config, max_batch: int = MAX_BATCH) -> tuple[tuple, dict]:
    """forward(input_ids (batch, sequence)): the example and its dynamic shapes; batch <= max_batch, sequence <= max_seq_len."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("sequence", min=1, max=config.max_seq_len)
    # batch and length >= 2 so neither axis is specialised to 1
    example = (torch.zeros(2 if max_batch >= 2 else 1, min(9, config.max_seq_len), dtype=torch.long),)
    return example, {"input_ids": {0: batch, 1: seq}}
