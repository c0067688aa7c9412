"""The decoder with state (`decoder.onnx`) driven from numpy: prefill ragged prompts, then step.

Torch-free. Per layer the state holds the normalised conv inputs and kernel values of every
slot so far, slot-major: (slots, batch, width). The graph returns only the new slots' entries;
they are appended in place to buffers with spare capacity, and the filled part goes back to the
graph as a view, so a step copies nothing that grows with the context. Ragged prompts are padded
on the left of the storage with `pad` telling each row where its position 0 is, so every row
appends at the same slot while the kernel still sees absolute positions (left padding of the
*tokens*, as a plain model would see it, would change results).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RuntimeInputError
from .runner import check_ids
from .session import check_provider, locate, open_session, read_config

DECODER_NAME = "decoder.onnx"
# A prompt goes in chunks: the chunk's (t, context + t) kernel taps stay cache-sized. Measured for
# a 2048-token prompt (dim 512, depth 4, 2 threads): whole 2.3 s, chunks of 512 1.0 s, 256 0.9 s.
PREFILL_CHUNK = 256


class _Slots:
    """Growable slot-major buffers, one per state tensor; `filled` slots are in use."""

    def __init__(self, arrays: list[np.ndarray], filled: int):
        self.arrays, self.filled = arrays, filled

    def reserve(self, slots: int, limit: int) -> None:
        if slots > self.arrays[0].shape[0]:
            capacity = min(max(slots, 2 * self.arrays[0].shape[0], 64), max(limit, slots))
            grown = [np.empty((capacity, *a.shape[1:]), np.float32) for a in self.arrays]
            for new, old in zip(grown, self.arrays):
                new[: self.filled] = old[: self.filled]
            self.arrays = grown


@dataclass(frozen=True)
class DecoderState:
    """What the decoder has seen: `length` slots of per-layer entries; row b's position 0 is at slot pad[b].

    A state is a value: stepping returns a new one and leaves this one usable (stepping twice from
    the same state copies the buffers on the second time instead of overwriting the first's slots).
    """

    pad: np.ndarray
    length: int
    slots: _Slots

    @property
    def tokens(self) -> np.ndarray:
        """(b,) how many tokens each row holds."""
        return self.length - self.pad

    @property
    def nbytes(self) -> int:
        return sum(a[: self.length].nbytes for a in self.slots.arrays)

    def past(self, names: list[str]) -> dict[str, np.ndarray]:
        return {name: a[: self.length] for name, a in zip(names, self.slots.arrays)}

    def rows(self, keep: np.ndarray) -> "DecoderState":
        """The state of rows `keep` (indices) only, in new buffers."""
        arrays = [np.ascontiguousarray(a[: self.length, keep]) for a in self.slots.arrays]
        return DecoderState(self.pad[keep], self.length, _Slots(arrays, self.length))


class Decoder:
    """An onnxruntime session over `decoder.onnx`. model: a gss-export folder or the decoder .onnx file."""

    def __init__(self, model: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        check_provider(provider, threads)
        path = Path(model)
        self.path, config_file = locate(path, DECODER_NAME) if path.is_dir() else locate(path)
        self.session = open_session(self.path, provider, threads)
        self.providers: list[str] = self.session.get_providers()
        self.config: dict = read_config(self.path, config_file, self.session)
        depth = self.config["depth"]
        self.past_names = [f"past_u.{i}" for i in range(depth)] + [f"past_k.{i}" for i in range(depth)]
        self.new_names = [f"new_u.{i}" for i in range(depth)] + [f"new_k.{i}" for i in range(depth)]
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (["input_ids", "pad", *self.past_names], ["logits", *self.new_names]):
            raise RuntimeInputError(
                f"{self.path} is not a gss-export decoder with state for this config: found inputs {names[0]} "
                f"and outputs {names[1]} (re-export with gss-export --format onnx)"
            )

    def empty_state(self, pad: Sequence[int] | np.ndarray) -> DecoderState:
        """The state before any token, for rows with `pad` padding tokens before their position 0.

        It holds one zero slot, itself padding (never read): onnxruntime 1.31 dies with SIGFPE on a
        zero-length past, so the graph is always given at least one slot.
        """
        c = self.config
        widths = [c["dim_dsconv"]] * c["depth"] + [c["heads"]] * c["depth"]
        pad = np.asarray(pad, np.int64) + 1
        return DecoderState(pad, 1, _Slots([np.zeros((1, len(pad), w), np.float32) for w in widths], 1))

    def feed(self, input_ids, state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        """input_ids (b, t) for slots length..length+t-1 -> logits (b, t, num_tokens), new state."""
        ids = check_ids(input_ids, self.config)
        t, limit = ids.shape[1], self.config["max_seq_len"]
        if int(state.tokens.max()) + t > limit:
            raise RuntimeInputError(f"the sequence would exceed max_seq_len {limit}")
        outputs = self.session.run(None, {"input_ids": ids, "pad": state.pad, **state.past(self.past_names)})
        slots = state.slots
        if slots.filled != state.length:  # another state already grew these buffers: branch off a copy
            slots = _Slots([a[: state.length].copy() for a in slots.arrays], state.length)
        slots.reserve(state.length + t, limit + int(state.pad.max(initial=0)))
        for buffer, new in zip(slots.arrays, outputs[1:]):
            buffer[state.length : state.length + t] = new
        slots.filled = state.length + t
        return outputs[0], DecoderState(state.pad, state.length + t, slots)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, DecoderState]:
        """Prompts of any lengths -> logits after each prompt's last token (b, num_tokens), and the state."""
        if len(prompts) == 0:
            raise RuntimeInputError("no prompts given")
        rows = [check_ids(p, self.config, one_sequence=True)[0] for p in prompts]
        longest = max(len(r) for r in rows)
        padded = np.zeros((len(rows), longest), np.int64)
        for i, r in enumerate(rows):
            padded[i, longest - len(r) :] = r
        state = self.empty_state([longest - len(r) for r in rows])
        for start in range(0, longest, PREFILL_CHUNK):
            logits, state = self.feed(padded[:, start : start + PREFILL_CHUNK], state)
        return logits[:, -1], state

    def step(self, tokens, state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        """One new token per row (b,) -> logits (b, num_tokens) for the token after it, and the state."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state)
        return logits[:, 0], state
