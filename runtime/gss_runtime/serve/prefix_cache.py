"""Prefix caching: decoder states kept at request boundaries, so that a prompt extending one feeds only its rest.

A chat client resends the whole conversation every turn. The engine keeps a snapshot of one row's decoder
state at the end of each prompt (after its prefill) and at the end of each completion: the state after the
tokens it has actually consumed (the prompt and the generated tokens that were fed; the last sampled token
never is), with the logits that follow them. A new prompt starts from the snapshot of its longest cached
prefix and feeds only the rest; a prompt equal to a key feeds nothing and samples from the stored logits.

Keys are exact token sequences, with no block alignment. Lookup hashes the prompt's prefixes in one numpy pass
(a polynomial hash modulo 2^64) and looks them up only at the lengths that have entries, longest first; a hit
is confirmed by comparing the tokens, so a collision costs a comparison, never a wrong state.

Where a prompt leaves a recently used key after a common prefix of its own (two conversations on one system
prompt), its prefill is split there and that point is snapshotted too, so that the next prompt on the same
prefix finds it: what splitting a node of a radix tree gives.

Size: a recurrent family's snapshot is one row of its fixed-size state whatever the prefix (4 MiB for a
GatedStateSpacesLM at upstream's defaults, 8 KiB for a GatedExponentialSmoothingLM); a GatedDsConvLM's is its
past, 4 * depth * (dim_dsconv + heads) bytes a token. A snapshot's state, key and logits count against the
cache's own budget (not --state-memory); the least recently used go first.

Snapshots are values that no batch writes into. A recurrent state's arrays are replaced, never written, by
each call, so a snapshot may share them. An appended state's buffers are written by feeds, but only past the
feeding state's length, and a snapshot reads only up to its own: a one-row state's buffers are shared with
its snapshot (marked as others', so that feeding the snapshot would branch off a copy) unless that would
keep much spare capacity, and anything else is copied; a prompt resumed from a snapshot is fed a copy of it.
`repack(consume=True)` empties the lists of the states it reads, so every snapshot has lists of its own.
"""
from __future__ import annotations

import bisect
import collections
import itertools
from dataclasses import dataclass

import numpy as np

from ..decoder import PREFILL_CHUNK, Decoder, DecoderState, RecurrentState, _Slots

# the default --prefix-cache-memory: 256 snapshots of a GatedStateSpacesLM at upstream's defaults, 30 of a
# 4,000-token prefix of the benchmarks' GatedDsConvLM (8 KiB a token)
DEFAULT_CAPACITY = 1 << 30
# keys shorter than this are not kept, and a branch point must save at least this many tokens past the hit:
# a few tokens' prefill costs less than a snapshot's copy and its place in the cache
MIN_TOKENS = 16
# the most recently used keys a prompt is compared with to find where it branches off one (O(prompt) each)
BRANCH_SCAN = 64
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: its powers modulo 2^64 never vanish

State = DecoderState | RecurrentState


@dataclass(eq=False)
class Snapshot:
    """The decoder state after `key`'s tokens, one row (never fed, never consumed: an appended one's buffers
    may be shared with a state that appends past its length), and the logits after its last token."""

    key: np.ndarray  # (n,) int32 token ids
    hash: int
    state: State
    logits: np.ndarray  # (num_tokens,) float32
    nbytes: int


@dataclass(frozen=True)
class Plan:
    """How a prompt's prefill starts: from `snapshot` (None: the first token), snapshotting at `branch` on the
    way (0: nowhere)."""

    snapshot: Snapshot | None = None
    branch: int = 0

    @property
    def start(self) -> int:
        """Prompt tokens the snapshot already holds: not computed."""
        return 0 if self.snapshot is None else len(self.snapshot.key)

    @property
    def cold(self) -> bool:
        """Nothing to resume nor split: the prompt joins its call's batched prefill."""
        return self.snapshot is None and not self.branch


class PrefixCache:
    """Snapshots of `decoder` states keyed by the tokens they hold, least recently used evicted past `capacity` bytes.

    Used from the step loop's thread only; `usage` ((bytes, entries), replaced whole) may be read from any.
    """

    def __init__(self, decoder: Decoder, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"the prefix cache's capacity must be >= 1 byte, got {capacity}")
        self.decoder, self.capacity = decoder, capacity
        self._lru: collections.OrderedDict[Snapshot, None] = collections.OrderedDict()  # oldest first
        self._index: dict[tuple[int, int], list[Snapshot]] = {}  # (length, hash) -> its snapshots
        self._lengths: list[int] = []  # the distinct key lengths, ascending
        self._count: collections.Counter[int] = collections.Counter()  # keys per length
        self._powers = np.zeros(0, np.uint64)
        self.usage = (0, 0)

    @property
    def bytes(self) -> int:
        return self.usage[0]

    def __len__(self) -> int:
        return len(self._lru)

    # --- looking up ------------------------------------------------------------------
    def plan(self, prompt) -> Plan:
        """Where `prompt` (ids) starts: its longest cached prefix, and where it branches off a recent key."""
        if not self._lru:
            return Plan()
        ids = np.asarray(prompt, np.int64)
        hashes = self._hashes(ids)
        hit = None
        for length in reversed(self._lengths[: bisect.bisect_right(self._lengths, len(ids))]):
            hit = next((s for s in self._index.get((length, int(hashes[length - 1])), ())
                        if np.array_equal(s.key, ids[:length])), None)
            if hit is not None:
                break
        return Plan(hit, self._branch(ids, 0 if hit is None else len(hit.key)))

    def _branch(self, ids: np.ndarray, start: int) -> int:
        """The longest prefix `ids` shares with a recently used key, if it saves MIN_TOKENS past `start` and
        is not the whole prompt (whose end is snapshotted anyway); else 0."""
        best = start + MIN_TOKENS - 1
        for snap in itertools.islice(reversed(self._lru), BRANCH_SCAN):
            m = min(len(snap.key), len(ids))
            if m <= best:
                continue
            same = snap.key[:m] == ids[:m]
            common = m if same.all() else int(same.argmin())
            if common < len(ids):  # a key holding the whole prompt is no branch point
                best = max(best, common)
        return best if best >= start + MIN_TOKENS else 0

    def _hashes(self, ids: np.ndarray) -> np.ndarray:
        """(n,) uint64: the hash of ids[:i + 1] at i, sum of (id + 1) * BASE^(j + 1) modulo 2^64."""
        if len(self._powers) < len(ids):
            self._powers = np.cumprod(np.full(max(len(ids), 2 * len(self._powers), 1024), _BASE, np.uint64))
        return np.cumsum((ids.astype(np.uint64) + np.uint64(1)) * self._powers[: len(ids)], dtype=np.uint64)

    # --- computing from a snapshot ---------------------------------------------------------
    def resume(self, plan: Plan, prompt, spare: int = 0) -> tuple[np.ndarray, State]:
        """Feed `prompt` from `plan`'s snapshot (and its branch point): the logits after its last token
        (num_tokens,) and a one-row state of the engine's own, an appended one with `spare` free slots past the
        prompt (a batch of its own needs no copy then). Snapshots the branch point and the prompt's end."""
        ids = np.asarray(prompt, np.int64)
        snap, start = plan.snapshot, plan.start
        if snap is not None and snap in self._lru:
            self._lru.move_to_end(snap)
        if start == len(ids):  # the prompt is a key: nothing to feed
            return snap.logits, _detached(snap.state)
        state = self.decoder.empty_state([0]) if snap is None else snap.state
        # an appended state is fed in place: a copy of the snapshot with room for the rest (and the spare)
        state = state.repack([0], spare=len(ids) - start + spare) if isinstance(state, DecoderState) else _detached(state)
        for end in ([plan.branch] if plan.branch else []) + [len(ids)]:
            logits, state = self._feed(ids[start:end], state)
            self.store(ids[:end], state, 0, logits)
            start = end
        return logits, state

    def _feed(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """ids (t,) into a one-row state, in the calls Decoder.prefill would make: (logits (num_tokens,), state)."""
        d = self.decoder
        chunk = len(ids) if d.prefill_session is not None else PREFILL_CHUNK
        if not d.bounded:  # a recurrent call takes at most max_seq_len tokens
            chunk = min(chunk, d.config["max_seq_len"])
        for begin in range(0, len(ids), chunk):
            logits, state = d.feed(ids[None, begin : begin + chunk], state)
        return logits[0, -1], state

    # --- keeping -----------------------------------------------------------------------
    def store(self, key, state: State, row: int, logits: np.ndarray) -> None:
        """Keep row `row` of `state`, which has consumed exactly `key` (ids), and its next logits (num_tokens,)."""
        key = np.asarray(key, np.int64)
        if len(key) < MIN_TOKENS:
            return
        digest = int(self._hashes(key)[-1])
        same = next((s for s in self._index.get((len(key), digest), ()) if np.array_equal(s.key, key)), None)
        if same is not None:
            self._lru.move_to_end(same)
            return
        nbytes = _row_bytes(state, row) + 4 * len(key) + 4 * np.size(logits)
        if nbytes > self.capacity:
            return
        held = self.bytes
        while held + nbytes > self.capacity:  # room first, then the copy: the cache never holds more than capacity
            old, _ = self._lru.popitem(last=False)
            self._unindex(old)
            held -= old.nbytes
        self.usage = (held, len(self._lru))
        snap = Snapshot(key.astype(np.int32), digest, _row(state, row), np.array(logits, np.float32), nbytes)
        self._lru[snap] = None
        self._index.setdefault((len(key), digest), []).append(snap)
        if not self._count[len(key)]:
            bisect.insort(self._lengths, len(key))
        self._count[len(key)] += 1
        self.usage = (held + nbytes, len(self._lru))

    def _unindex(self, snap: Snapshot) -> None:
        n = len(snap.key)
        bucket = self._index[n, snap.hash]
        bucket.remove(snap)
        if not bucket:
            del self._index[n, snap.hash]
        self._count[n] -= 1
        if not self._count[n]:
            del self._count[n]
            self._lengths.pop(bisect.bisect_left(self._lengths, n))


def _row_bytes(state: State, row: int) -> int:
    """What `_row(state, row)` holds: a fixed row; an appended row's buffers (shared) or its slots from its
    position 0 plus one padding slot (copied)."""
    if isinstance(state, RecurrentState):
        return sum(a[row].nbytes for a in state.arrays)
    slots = state.slots.capacity if _shareable(state) else int(state.tokens[row]) + 1
    return slots * state.slots.slot_bytes


def _shareable(state: State) -> bool:
    """Whether an appended state's buffers can be a snapshot as they are: one row, no padding but the one slot
    a past needs, spare capacity at most a quarter of them (each copy of a long past costs tens of ms, most
    of it the kernel's first touch of new memory)."""
    capacity = state.slots.capacity
    return len(state.pad) == 1 and state.pad[0] == 1 and capacity - state.length <= state.length // 4


def _row(state: State, row: int) -> State:
    """Row `row` of `state` as a snapshot. Shared where that is safe and costs little: a one-row recurrent
    state's arrays (no call writes into them), a one-row appended state's buffers (a feed writes past its
    length only, and a snapshot reads up to it); otherwise in memory of its own, padding slots dropped."""
    if len(state.tokens) == 1 and (isinstance(state, RecurrentState) or _shareable(state)):
        return _detached(state)
    return state.rows(np.array([row]))


def _detached(state: State) -> State:
    """The same state under lists of its own: `repack(consume=True)` empties the lists it reads, not the arrays.
    An appended one's buffers are marked as others' (filled -1), so that a feed of it branches off a copy."""
    if isinstance(state, RecurrentState):
        return RecurrentState(state.pending.copy(), state.tokens.copy(), list(state.arrays))
    return DecoderState(state.pad.copy(), state.length, _Slots(list(state.slots.arrays), -1))
