"""The decoder with state (`decoder.onnx`, `prefill.onnx`) driven from numpy: prefill ragged prompts, then step.

Torch-free. The export's metadata says which of two kinds of state its family carries
(`gss_export.state`; exports without it are "append").

Recurrent families ("replace": GatedStateSpacesLM, GatedExponentialSmoothingLM): per layer one
state tensor of a fixed shape, batch first, which the graphs return whole after each call; a
step's cost and the state's size do not depend on the context. Ragged prompts are padded on the
left of the call and `pad` says how many leading positions of each row are padding (they enter
nothing); later calls have none.

GatedDsConvLM ("append"): per layer the state holds the normalised conv inputs and kernel values of every
slot so far: u head-major, (batch, heads, capacity, head_dim), k slot-major, (capacity, batch, heads).
The graphs return only the new slots' entries, written in place into buffers with spare capacity;
the step reads u's whole buffer as it lies (its room past the filled slots is zeros, which the graph
never reads into a result) and k's filled part as a view, so a step copies nothing that grows with the
context and reads the past once, with no transpose. Ragged prompts are padded on the left of the storage with `pad` telling each row where its position 0 is, so every row
appends at the same slot while the kernel still sees absolute positions (left padding of the
*tokens*, as a plain model would see it, would change results). Exports made before this layout
(u slot-major, (context, batch, dim_dsconv)) are refused, with a message to re-export.

The two graphs have one interface and give the same results; they differ in cost. `decoder.onnx`
reads the past directly, O(t * (context + t)) for t new tokens: a step. `prefill.onnx` runs the
full-sequence convolution over every slot, the cost of a forward of context + t tokens: a prompt or
a long continuation. `feed` sends more than `PREFILL_ABOVE` new tokens to prefill.onnx (exports made
before it existed fall back to chunks through decoder.onnx, which costs O(t^2)).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RuntimeInputError
from .runner import check_ids
from .session import SPIN_ALWAYS, SPIN_NEVER, locate, open_model_graph, read_config

DECODER_NAME = "decoder.onnx"
PREFILL_NAME = "prefill.onnx"
# more new tokens than this go through prefill.onnx unless the export says otherwise: up to it the direct read of the past is cheaper
# even after a long context (the same crossover as model.onnx's switch between conv forms)
PREFILL_ABOVE = 128
# without prefill.onnx a prompt goes through decoder.onnx in chunks: the chunk's (t, context + t)
# kernel taps stay cache-sized (2048-token prompt, dim 512: whole 2.3 s, chunks of 256 0.9 s)
PREFILL_CHUNK = 256


# the appended past's layout, config.json's export.decoder.past_layout (gss_export's decoder_io writes this
# value): u head-major over the caller's whole buffer; exports without it (u slot-major) are refused
PAST_LAYOUT = "u_head_major"

# room past an appended state's filled slots: a step multiplies u's whole buffer, and its untouched zero pages
# cost about what filled slots do (one row after 128 tokens, dim 512: 1.18x a step's time with 1,000 slots of
# room, 1.48x with 4,000, 2.92x with 16,000; 1.15x with 4,000 after 16,000 tokens), so room is kept to an
# eighth of the slots, at least ROOM_MIN: a step reads at most an eighth more than the state, and the state is
# copied once per slots / 8 tokens
ROOM_MIN = 256
ROOM_SHARE = 8


def headroom(slots: int, wanted: int | None = None) -> int:
    """Free slots to keep past `slots` filled ones for `wanted` tokens to come (None: as many as are kept)."""
    most = max(ROOM_MIN, slots // ROOM_SHARE)
    return most if wanted is None else min(max(wanted, 0), most)


def _at(a: np.ndarray, slots, rows) -> tuple:
    """The index of `slots` (a slice) of `rows` in an appended state's buffer: u (rows, heads, slots, d) or k (slots, rows, heads)."""
    return (rows, slice(None), slots) if a.ndim == 4 else (slots, rows)


def _with_capacity(a: np.ndarray, capacity: int, rows: int | None = None) -> np.ndarray:
    """Zeros shaped as buffer `a` with `capacity` slots (and `rows` rows): zeros, since the step reads u's room."""
    shape = list(a.shape)
    shape[2 if a.ndim == 4 else 0] = capacity
    if rows is not None:
        shape[0 if a.ndim == 4 else 1] = rows
    return np.zeros(shape, np.float32)  # calloc: pages the step only reads stay the kernel's shared zero page


def _first_slots(a: np.ndarray, slots: int, capacity: int) -> np.ndarray:
    """Buffer `a`'s first `slots` slots in a new zeroed buffer of `capacity` slots."""
    new = _with_capacity(a, capacity)
    new[_at(new, slice(0, slots), slice(None))] = a[_at(a, slice(0, slots), slice(None))]
    return new


class _Slots:
    """Growable buffers, one per state tensor (u head-major, then k slot-major); `filled` slots are in use.

    Growth copies every filled slot into new buffers, a stall that grows with the context (363 ms after a
    16,384-token prompt at dim 512, against 17 ms for a step). So whoever knows how many tokens are to
    come reserves room for them (`room`: prefill, feed, rows, repack's `spare`), which is honoured exactly.
    The room is zeros that a step multiplies (u's whole buffer goes in), and untouched zero pages cost a
    step about what filled slots do, so the Generator and gss-serve reserve at most `headroom` (an eighth
    of the context, at least 256 slots), and a feed past the capacity grows it by that much: one copy of
    the state per context / 8 tokens, a layer at a time (the transient is one layer's buffers).
    """

    def __init__(self, arrays: list[np.ndarray], filled: int):
        self.arrays, self.filled = arrays, filled
        self.lock = threading.Lock()  # claiming slots is check-then-write: states fed from two threads

    @property
    def capacity(self) -> int:
        return self.arrays[-1].shape[0]  # a k buffer: (capacity, rows, heads)

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot of one row holds, over every buffer."""
        return sum(a.itemsize * (a.shape[1] * a.shape[3] if a.ndim == 4 else a.shape[2]) for a in self.arrays)

    def copy(self, slots: int, capacity: int | None = None) -> "_Slots":
        """The first `slots` slots in new buffers of `capacity` slots (default: just those)."""
        return _Slots([_first_slots(a, slots, slots if capacity is None else capacity) for a in self.arrays], slots)

    def reserve(self, slots: int, limit: int, room: int | None = None) -> None:
        """Capacity for `slots` slots, and for `room` more when the buffers must grow or were reserved for
        fewer (never past `limit`, the most slots a row can fill); with no room said (None), growth adds
        `headroom`."""
        capacity = min(slots + max(room or 0, 0), max(limit, slots))
        if capacity > self.capacity:
            if room is None:
                capacity = min(slots + headroom(slots), max(limit, slots))
            for i, a in enumerate(self.arrays):  # a layer at a time: the old buffer goes before the next is made
                self.arrays[i] = _first_slots(a, self.filled, capacity)


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
        return self.length * len(self.pad) * self.slots.slot_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers, spare capacity included: what the state holds in memory."""
        return sum(a.nbytes for a in self.slots.arrays)

    def rows(self, keep: np.ndarray, spare: int = 0) -> "DecoderState":
        """The state of rows `keep` (indices, repeats allowed: a row forked) only, in new buffers with
        `spare` free slots (the feeds still to come).

        Slots that are padding for every kept row are dropped (one is kept: the graph needs a past),
        so a batch whose long rows have left steps at the cost of the rows it still holds.
        """
        return self.repack(keep, spare=spare)

    def join(self, other: "DecoderState") -> "DecoderState":
        """This state's rows, then `other`'s, in one batch (new buffers).

        Both are right-aligned on the longer one's slots, the shorter's rows gaining leading padding
        slots (zeros: masked, so they must at least be finite), so every row appends at the same slot.
        """
        return self.repack(np.arange(len(self.pad)), other)

    def repack(self, keep, other: "DecoderState | Sequence[DecoderState] | None" = None, spare: int = 0,
               consume: bool = False) -> "DecoderState":
        """Rows `keep` of this state, then every row of `other` (a state, or several in turn), right-aligned in
        new buffers with `spare` slots past the filled ones (so that feeds of up to `spare` tokens append
        without growing them).

        consume=True releases each of the old per-layer buffers as soon as it is copied, so the transient
        is one layer's buffers instead of a second whole state; none of the old states may be used afterwards.
        """
        keep = np.asarray(keep, np.int64)
        others = _states(other, DecoderState)
        # slots that are padding for every kept row are dropped (one is kept: the graph needs a past)
        drop = int(self.pad[keep].min()) - 1 if len(keep) else self.length - 1
        mine_length = self.length - drop
        length = max([mine_length, *(o.length for o in others)])
        total = len(keep) + sum(len(o.pad) for o in others)
        mine = self.slots.arrays
        arrays = []
        for i in range(len(mine)):
            # zeros: the leading padding slots and the room past `length` (feeds write those slots; the step reads u's room)
            joined = _with_capacity(mine[i], length + spare, total)
            for j, row in enumerate(keep):  # row by row: no temporary copy of the whole state
                joined[_at(joined, slice(length - mine_length, length), j)] = mine[i][_at(mine[i], slice(drop, self.length), row)]
            column = len(keep)
            for o in others:
                end = column + len(o.pad)
                src = o.slots.arrays[i]
                joined[_at(joined, slice(length - o.length, length), slice(column, end))] = src[_at(src, slice(0, o.length), slice(None))]
                column = end
            if consume:
                mine[i] = None
                for o in others:
                    o.slots.arrays[i] = None
            arrays.append(joined)
        pad = np.concatenate([self.pad[keep] - drop + length - mine_length, *(o.pad + length - o.length for o in others)])
        return DecoderState(pad, length, _Slots(arrays, length))


@dataclass(frozen=True)
class RecurrentState:
    """A recurrent family's state: per layer one (b, ...) array, replaced by each call; `pending` leading
    padding positions per row are still to come (a ragged prompt not yet fed)."""

    pending: np.ndarray
    tokens: np.ndarray  # (b,) real tokens seen per row
    arrays: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    held_bytes = nbytes

    def rows(self, keep: np.ndarray, spare: int = 0) -> "RecurrentState":
        """Rows `keep` (indices, repeats allowed: a row forked); spare: for DecoderState's interface."""
        return self.repack(keep)

    def join(self, other: "RecurrentState") -> "RecurrentState":
        """This state's rows, then `other`'s, in one batch: fixed-shape states simply stack."""
        return self.repack(np.arange(len(self.tokens)), other)

    def repack(self, keep, other: "RecurrentState | Sequence[RecurrentState] | None" = None, spare: int = 0,
               consume: bool = False) -> "RecurrentState":
        """Rows `keep` of this state, then every row of `other` (a state, or several in turn), in new arrays
        (spare: for DecoderState's interface, a fixed state never grows; consume: as DecoderState.repack)."""
        keep = np.asarray(keep, np.int64)
        others = _states(other, RecurrentState)
        arrays = []
        for i, mine in enumerate(self.arrays):
            kept = mine[keep]  # a new array already
            arrays.append(np.concatenate([kept, *(o.arrays[i] for o in others)]) if others else kept)
            if consume:
                self.arrays[i] = None
                for o in others:
                    o.arrays[i] = None
        if not others:
            return RecurrentState(self.pending[keep], self.tokens[keep], arrays)
        return RecurrentState(np.concatenate([self.pending[keep], *(o.pending for o in others)]),
                              np.concatenate([self.tokens[keep], *(o.tokens for o in others)]), arrays)


def _states(other, kind) -> list:
    """repack's `other`: none, one state, or several."""
    return [] if other is None else [other] if isinstance(other, kind) else list(other)


class Decoder:
    """`decoder.onnx` and, where exported, `prefill.onnx`, opened on a backend (graphs `session`, `prefill_session`).

    model: a gss-export folder or the decoder .onnx file (prefill.onnx is looked for beside it).
    backend, provider, threads, precision: as GSSRunner's; measuring=True skips bf16's quality record (for
    gss-export's check that measures what the record will say).
    spin: how onnxruntime's idle threads wait for decoder.onnx. SPIN_ALWAYS (onnxruntime's default) also spins
    between calls, the fastest when steps come back to back and nothing else runs; SPIN_IN_CALL stops at the
    end of each call, for a server whose event loop and clients share the cores; SPIN_NEVER.
    """

    def __init__(self, model: str | os.PathLike, provider: str = "auto", threads: int | None = None, spin: str = SPIN_ALWAYS,
                 backend: str = "onnxruntime", precision: str = "f32", measuring: bool = False):
        path = Path(model)
        self.path, config_file = locate(path, DECODER_NAME) if path.is_dir() else locate(path)
        self.session = open_model_graph(self.path, config_file, backend, provider, threads, spin, precision, measuring)
        self.providers: list[str] = self.session.devices
        self.config: dict = read_config(self.path, config_file, self.session)
        depth = self.config["depth"]
        meta = lambda key, default: self.session.meta(key) or default  # noqa: E731
        self.kind = json.loads(meta("gss_export.state", '"append"'))
        # more new tokens than this go to prefill.onnx: the family's measured crossover, as the export recorded it
        self.prefill_above = int(json.loads(meta("gss_export.prefill_above", str(PREFILL_ABOVE))))
        if self.kind == "append":
            if json.loads(meta("gss_export.past_layout", "null")) != PAST_LAYOUT:
                raise RuntimeInputError(
                    f"{self.path} was exported before the decoder's past became head-major (u as (batch, heads, "
                    f"capacity, head_dim)); this runtime reads only that layout: re-export it with gss-export")
            self.past_names = [f"past_u.{i}" for i in range(depth)] + [f"past_k.{i}" for i in range(depth)]
            self.new_names = [f"new_u.{i}" for i in range(depth)] + [f"new_k.{i}" for i in range(depth)]
        else:  # names and fixed shapes as the export wrote them down
            spec = json.loads(meta("gss_export.inputs", "[]"))[2:]
            self.past_names = [t["name"] for t in spec]
            self.new_names = [f"new_{name}" for name in self.past_names]
            self.state_shapes = [tuple(t["shape"][1:]) for t in spec]
        self._check_names(self.session, self.path)
        # a decoder.onnx of a fixed one token per call (a family's one-token step): longer calls that must go
        # through it are fed one token at a time (the export sends them to prefill.onnx by default)
        self.one_token = self.session.inputs[0][1][1:] == [1]
        prefill = self.path.with_name(PREFILL_NAME)
        self.prefill_session = None
        if prefill.is_file() and prefill != self.path:
            self.prefill_session = open_model_graph(prefill, config_file, backend, provider, threads,
                                                    SPIN_NEVER if spin == SPIN_ALWAYS else spin, precision, measuring)
            self._check_names(self.prefill_session, prefill)

    def _check_names(self, session, path: Path) -> None:
        names = (session.input_names, session.output_names)
        if names != (["input_ids", "pad", *self.past_names], ["logits", *self.new_names]):
            raise RuntimeInputError(
                f"{path} is not a gss-export decoder with state for this config: found inputs {names[0]} "
                f"and outputs {names[1]} (re-export with gss-export --format onnx)"
            )

    @property
    def bounded(self) -> bool:
        """Whether the context is limited by max_seq_len (an appended state); a recurrent one only limits each call."""
        return self.kind == "append"

    def empty_state(self, pad: Sequence[int] | np.ndarray) -> DecoderState | RecurrentState:
        """The state before any token, for rows with `pad` padding tokens before their position 0.

        Appended: one zero slot, itself padding (never read): onnxruntime 1.31 dies with SIGFPE on a
        zero-length past, so the graph is always given at least one slot. Recurrent: zeros.
        """
        c = self.config
        if self.kind != "append":
            pad = np.asarray(pad, np.int64)
            return RecurrentState(pad, np.zeros_like(pad), [np.zeros((len(pad), *s), np.float32) for s in self.state_shapes])
        pad = np.asarray(pad, np.int64) + 1
        heads, b = c["heads"], len(pad)
        u = [np.zeros((b, heads, 1, c["dim_dsconv"] // heads), np.float32) for _ in range(c["depth"])]
        return DecoderState(pad, 1, _Slots(u + [np.zeros((1, b, heads), np.float32) for _ in range(c["depth"])], 1))

    def feed(self, input_ids, state: DecoderState, whole: bool | None = None, room: int | None = None) -> tuple[np.ndarray, DecoderState]:
        """input_ids (b, t) for slots length..length+t-1 -> logits (b, t, num_tokens), new state.

        whole: run prefill.onnx (True) or decoder.onnx (False); by default prefill.onnx for more
        than the export's prefill_above tokens when the export has it.
        room: free slots to have past the new ones, for the tokens still to come (an appended state's
        buffers are grown to hold them now, so later feeds copy nothing; a recurrent state ignores it);
        None: nothing said, and buffers that must grow get `headroom`.
        """
        ids = check_ids(input_ids, self.config)
        t, limit = ids.shape[1], self.config["max_seq_len"]
        if whole and self.prefill_session is None:
            raise RuntimeInputError(f"{self.path.parent} has no {PREFILL_NAME} (re-export with gss-export --format onnx)")
        if whole is None:
            whole = self.prefill_session is not None and t > self.prefill_above
        if self.kind != "append":
            if not whole and self.one_token and t > 1:
                pieces = []
                for j in range(t):
                    logits, state = self.feed(ids[:, j : j + 1], state, whole=False)
                    pieces.append(logits)
                return np.concatenate(pieces, axis=1), state
            session = self.prefill_session if whole else self.session
            call_pad = np.minimum(state.pending, t)
            outputs = session.run({"input_ids": ids, "pad": call_pad, **dict(zip(self.past_names, state.arrays))})
            return outputs[0], RecurrentState(state.pending - call_pad, state.tokens + t - call_pad, outputs[1:])
        if int(state.tokens.max()) + t > limit:
            raise RuntimeInputError(f"the sequence would exceed max_seq_len {limit}")
        slots = state.slots
        with slots.lock:
            if slots.filled != state.length:  # another state already grew these buffers: branch off a copy
                slots = slots.copy(state.length)
            slots.reserve(state.length + t, limit + int(state.pad.max(initial=0)), room)
            slots.filled = state.length + t  # claimed before the call: a second feed of `state` branches off
        # u goes in as its whole buffer (the graph takes the context from k), k as a view of its filled slots;
        # the graph writes the new k entries straight into their slots and the new u entries (t, b, heads * d)
        # into a small buffer moved into place here: nothing that grows with the context is copied
        session = self.prefill_session if whole else self.session
        depth, L = self.config["depth"], state.length
        feeds = {"input_ids": ids, "pad": state.pad, **dict(zip(self.past_names[:depth], slots.arrays[:depth])),
                 **{name: past[:L] for name, past in zip(self.past_names[depth:], slots.arrays[depth:])}}
        fresh = [np.empty((t, len(state.pad), a.shape[1] * a.shape[3]), np.float32) for a in slots.arrays[:depth]]
        into = {**dict(zip(self.new_names[:depth], fresh)),
                **{name: buffer[L : L + t] for name, buffer in zip(self.new_names[depth:], slots.arrays[depth:])}}
        logits = session.run_into(feeds, into)
        for buffer, entries in zip(slots.arrays[:depth], fresh):
            buffer[:, :, L : L + t] = entries.reshape(t, buffer.shape[0], buffer.shape[1], buffer.shape[3]).transpose(1, 2, 0, 3)
        return logits, DecoderState(state.pad, L + t, slots)

    def prefill(self, prompts: Sequence[Sequence[int]], every: bool = False, room: int = 0) -> tuple[np.ndarray, DecoderState]:
        """Prompts of any lengths -> logits after each prompt's last token (b, num_tokens), and the state,
        with `room` free slots for the tokens to come (feed's; reserved with the first call).

        every=True: the logits after every position instead, (b, longest, num_tokens), each row's
        prompt right-aligned (row b's real positions are the last len(prompts[b])): what scoring a
        prompt needs, from the same call(s).
        With prefill.onnx the prompts go in one call at full-sequence cost; without it, in chunks. A
        recurrent state has no limit on the context, so its prompts may exceed max_seq_len: they go in
        calls of max_seq_len tokens.
        """
        if len(prompts) == 0:
            raise RuntimeInputError("no prompts given")
        rows = [self.check_prompt(p) for p in prompts]
        longest = max(len(r) for r in rows)
        padded = np.zeros((len(rows), longest), np.int64)
        for i, r in enumerate(rows):
            padded[i, longest - len(r) :] = r
        state = self.empty_state([longest - len(r) for r in rows])
        chunk = longest if self.prefill_session is not None else PREFILL_CHUNK
        if not self.bounded:
            chunk = min(chunk, self.config["max_seq_len"])
        pieces = []
        for start in range(0, longest, chunk):
            logits, state = self.feed(padded[:, start : start + chunk], state, room=max(longest - start - chunk, 0) + room)
            pieces.append(logits if every else logits[:, -1:])
        if not every:
            return pieces[-1][:, 0], state
        return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)), state

    def check_prompt(self, prompt) -> np.ndarray:
        """One prompt's ids, checked: (n,) int64. Past max_seq_len only for an appended state."""
        if self.bounded:
            return check_ids(prompt, self.config, one_sequence=True)[0]
        try:
            length = len(prompt)
        except TypeError:  # a number or a 0-d array: check_ids says what is wrong with it
            length = 0
        return check_ids(prompt, {**self.config, "max_seq_len": length}, one_sequence=True)[0]

    def step(self, tokens, state: DecoderState, room: int | None = None) -> tuple[np.ndarray, DecoderState]:
        """One new token per row (b,) -> logits (b, num_tokens) for the token after it, and the state
        (room: feed's, free slots to have past this one if the buffers must grow now)."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state, room=room)
        return logits[:, 0], state
