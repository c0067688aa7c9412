"""What every torch.export-based target traces: example inputs and symbolic axes, forward and step.

Shared by the ONNX exports (model.onnx, decoder.onnx) and the torch.export targets (pt2, aoti), so
all of them agree on names, on which axes are dynamic and on their bounds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

from .model import GatedDsConvLM, GSSConfig

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


class StepGraph(nn.Module):
    """`model.step` (or `model.prefill` with `whole=True`) as a module's forward with flat outputs
    (logits, *new_u, *new_k), so an exporter sees named tensor inputs and outputs."""

    def __init__(self, model: GatedDsConvLM, whole: bool = False):
        super().__init__()
        self.model, self.whole = model, whole

    def forward(self, input_ids, pad, past_u, past_k):
        advance = self.model.prefill if self.whole else self.model.step
        logits, new_u, new_k = advance(input_ids, pad, past_u, past_k)
        return (logits, *new_u, *new_k)


def forward_signature(config: GSSConfig) -> tuple[tuple, dict]:
    """forward(input_ids (batch, sequence)): the example and its dynamic shapes; sequence <= max_seq_len."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("sequence", min=1, max=config.max_seq_len)
    # batch and length >= 2 so neither axis is specialised to 1
    example = (torch.zeros(2, min(9, config.max_seq_len), dtype=torch.long),)
    return example, {"input_ids": {0: batch, 1: seq}}


def step_signature(config: GSSConfig) -> tuple[tuple, dict]:
    """StepGraph.forward(input_ids, pad, past_u, past_k): the example and its dynamic shapes.

    context >= 1: onnxruntime 1.31 dies (SIGFPE) on a zero-length past, so runtimes start from one
    padding slot (pad counts it), see gss_runtime.decoder.Decoder.empty_state; the other targets
    follow the same convention.
    """
    c = config
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    new = torch.export.Dim("new_tokens", min=1, max=c.max_seq_len)
    context = torch.export.Dim("context", min=1, max=c.max_seq_len + 1)
    # example sizes >= 2 and distinct, so no axis specialises or gets tied to another
    example = (
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([1, 0]),
        # distinct tensors per layer: the exporter would merge aliased inputs into one
        [torch.zeros(5, 2, c.dim_dsconv) for _ in range(c.depth)],
        [torch.zeros(5, 2, c.heads) for _ in range(c.depth)],
    )
    dynamic = {
        "input_ids": {0: batch, 1: new},
        "pad": {0: batch},
        "past_u": [{0: context, 1: batch}] * c.depth,
        "past_k": [{0: context, 1: batch}] * c.depth,
    }
    return example, dynamic
