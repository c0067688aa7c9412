"""The decoder's contract, written once: input and output names, shapes, the state's kind, and what
torch.export and the ONNX exporter trace for `step` and `prefill`.

Two kinds of state, one per family kind (the config's `state`, `families.gated.FamilyConfig`):

- "append" (GatedDsConvLM): inputs input_ids (batch, new_tokens), pad (batch,) the slot of each
  row's position 0, past_u.i (batch, heads, capacity, dim_dsconv / heads) and past_k.i (context,
  batch, heads); outputs logits and the new slots' entries new_u.i, new_k.i (new_tokens, batch, .),
  which the caller writes at slots context.. (past_u head-major: new_u's (t, b, heads * d) as
  [:, :, context:context + t, :]). past_u is the caller's whole buffer: its first context slots are
  filled, the rest is room for the tokens to come (finite: zeros), so the step reads it as it lies,
  once, with no transpose and no copy; the context comes from past_k. context >= 1: onnxruntime 1.31
  dies (SIGFPE) on a zero-length past, so every runtime starts from one padding slot. Exports made
  before the head-major past (past_u.i (context, batch, dim_dsconv)) are refused by the runtimes
  (`past_layout` below), with a message to re-export.
- "replace" (GatedStateSpacesLM, GatedExponentialSmoothingLM): inputs input_ids, pad (batch,) the
  leading padding positions of each row in this call, state.i (batch, ...) of a fixed shape;
  outputs logits and new_state.i, the whole state after the call, of the same shape. Where the
  family has a one-token step (GatedStateSpacesLM), decoder.onnx takes input_ids (batch, 1)
  (`step_new_tokens`: 1) and prefill.onnx every call of more.

config.json's export.decoder carries all of it, and the runtimes (Python, Node.js, C++) read it from there.
"""
from __future__ import annotations

import torch
from torch import nn

from gss_runtime.decoder import PAST_LAYOUT  # the appended past's layout, as the runtime reads it

from .signatures import MAX_BATCH


def state_kind(config) -> str:
    return config.state


def input_names(config) -> list[str]:
    d = config.depth
    if state_kind(config) == "append":
        return ["input_ids", "pad"] + [f"past_u.{i}" for i in range(d)] + [f"past_k.{i}" for i in range(d)]
    return ["input_ids", "pad"] + [f"state.{i}" for i in range(d)]


def output_names(config) -> list[str]:
    d = config.depth
    if state_kind(config) == "append":
        return ["logits"] + [f"new_u.{i}" for i in range(d)] + [f"new_k.{i}" for i in range(d)]
    return ["logits"] + [f"new_state.{i}" for i in range(d)]


def describe(config) -> dict:
    """Names, dtypes and shapes of the decoder's inputs and outputs, and its state's kind and size
    (stored in config.json and the decoder's metadata)."""
    c, kind = config, state_kind(config)
    above = config.prefill_above  # the runtimes send calls of more new tokens to prefill.onnx
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]}
    logits = {"name": "logits", "dtype": "float32", "shape": ["batch", "new_tokens", c.num_tokens]}

    def tensors(names, shapes):
        return [{"name": n, "dtype": "float32", "shape": s} for n, s in zip(names, shapes)]

    if kind == "append":
        widths = [c.dim_dsconv] * c.depth + [c.heads] * c.depth
        past = [["batch", c.heads, "capacity", c.dim_dsconv // c.heads]] * c.depth + [["context", "batch", c.heads]] * c.depth
        return {
            "state": kind,
            "past_layout": PAST_LAYOUT,
            "prefill_above": above,
            "inputs": [{**ids, "doc": "tokens for slots context..context+new_tokens-1"},
                       {"name": "pad", "dtype": "int64", "shape": ["batch"], "doc": "slot of each row's position 0: padding slots before it are never read"},
                       *tensors(input_names(c)[2:], past)],
            "outputs": [logits, *tensors(output_names(c)[1:], [["new_tokens", "batch", w] for w in widths])],
            "state_bytes_per_token": 4 * c.depth * (c.dim_dsconv + c.heads),
        }
    shapes = c.state_shapes()
    return {
        "state": kind,
        "prefill_above": above,
        # decoder.onnx's new tokens per call where it takes a fixed number (1: the family's one-token step;
        # prefill.onnx takes any); absent: any
        **({"step_new_tokens": c.step_tokens} if c.step_tokens else {}),
        "inputs": [{**ids, "doc": "new tokens after the state"},
                   {"name": "pad", "dtype": "int64", "shape": ["batch"], "doc": "leading padding positions of each row in this call (a ragged prompt; 0 afterwards)"},
                   *tensors(input_names(c)[2:], shapes)],
        "outputs": [logits, *tensors(output_names(c)[1:], shapes)],
        "state_bytes": 4 * sum(_size(s) for s in shapes),  # per row, whatever the context
    }


def _size(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 1
    return n


class StepGraph(nn.Module):
    """`model.step` (or `model.prefill` with `whole=True`) as a module's forward with flat outputs
    (logits, *state outputs in `output_names` order), so an exporter sees named tensors."""

    def __init__(self, model: nn.Module, whole: bool = False, one_token: bool = False):
        super().__init__()
        self.model, self.whole, self.one_token = model, whole, one_token

    def forward(self, input_ids, pad, *state):
        advance = self.model.prefill if self.whole else self.model.step_one if self.one_token else self.model.step
        logits, *entries = advance(input_ids, pad, *state)
        return (logits, *[t for group in entries for t in group])


def step_signature(config, one_token: bool = False, max_batch: int = MAX_BATCH, max_new: int | None = None
                   ) -> tuple[tuple, dict]:
    """StepGraph.forward's example inputs and their dynamic shapes (batch up to max_batch, new_tokens up to max_new
    or max_seq_len, and context for "append"); one_token: new_tokens fixed at 1 (a recurrent family's `step_one`)."""
    c = config
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    new = torch.export.Dim("new_tokens", min=1, max=max(min(max_new or c.max_seq_len, c.max_seq_len), 3))
    # example sizes >= 2 and distinct, so no axis specialises or gets tied to another; distinct
    # tensors per layer, since the exporter would merge aliased inputs into one
    ids, pad = torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 0])
    if one_token:
        example = (ids[:, :1], pad, [torch.zeros(2, *s[1:]) for s in c.state_shapes()])
        return example, {"input_ids": {0: batch}, "pad": {0: batch}, "state": ([{0: batch}] * c.depth,)}
    if state_kind(c) == "append":
        context = torch.export.Dim("context", min=1, max=c.max_seq_len + 1)
        capacity = torch.export.Dim("capacity", min=1, max=c.max_seq_len + 1)
        example = (ids, pad, [torch.zeros(2, c.heads, 7, c.dim_dsconv // c.heads) for _ in range(c.depth)],
                   [torch.zeros(5, 2, c.heads) for _ in range(c.depth)])
        return example, {"input_ids": {0: batch, 1: new}, "pad": {0: batch},
                         "state": ([{0: batch, 2: capacity}] * c.depth, [{0: context, 1: batch}] * c.depth)}
    example = (ids, pad, [torch.zeros(2, *s[1:]) for s in c.state_shapes()])
    return example, {"input_ids": {0: batch, 1: new}, "pad": {0: batch}, "state": ([{0: batch}] * c.depth,)}
