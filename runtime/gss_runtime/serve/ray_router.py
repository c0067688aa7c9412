"""Prefix affinity on Ray Serve: a request goes to the replica that was sent the longest start of its prompt.

A replica's engine keeps the decoder states of prompts (and completions) it has run, and a later prompt that
starts with one of them prefills only the rest. Ray Serve's default router (power of two choices: two
random replicas, the one with the shorter queue) scatters a conversation's turns over the replicas, so
most of them miss. `PrefixAffinityRouter` is a Ray Serve request router (`RequestRouterConfig(
request_router_class=...)`) that remembers which prompts it has sent where and, for each request:

1. finds, among the replicas, those that were sent the longest prefix of its prompt (`PrefixIndex`);
2. sends it there when that prefix is substantial (at least `min_match` characters or token ids, and
   `match_ratio` of the prompt) and the replica is not much busier than the least busy one (at most
   `max_imbalance` more ongoing requests); a replica at its `max_ongoing_requests` is passed over;
3. otherwise does what Ray's default does: two random replicas, the shorter queue; a tie goes to the one
   that holds the fewest prefixes, so that new conversations spread over the replicas.

The router runs where the requests are sent from (`ray_app.GSSIngress`, which reads the HTTP body Ray's
proxy does not show a router) and sees a request's prompt as one string, its *key* (`prefix_key`): the
text of a completion's prompt, its token ids (one character each), or a chat's messages, each rendered
as JSON. Only the first MAX_KEY_CHARS of a key count. The index is bounded: `index_chars` characters of
keys over all replicas (about 11 MiB of memory at the default), the least recently sent dropped first.
"""
from __future__ import annotations

import json
import random
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Iterator

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK = 16  # characters (or token ids) per indexed block: a match counts whole blocks
MAX_KEY_CHARS = 32768  # a key's characters that count: past them, two prompts are not told apart
DEFAULT_INDEX_CHARS = 1 << 20  # characters of keys the index holds, over all replicas (~11 MiB of Python objects)
DEFAULT_MIN_MATCH = 64  # the least match that routes (characters of text, or token ids)
DEFAULT_MATCH_RATIO = 0.1  # ... and the least share of the key it must cover
DEFAULT_MAX_IMBALANCE = 16  # ongoing requests a replica may have beyond the least busy one and still be chosen

_MASK = (1 << 64) - 1
_SLOT_BITS = 16  # an index entry is (a block's chained hash, the replica's slot) packed in one int
_SURROGATES = 0x800  # token ids from 0xD800 are shifted past the surrogate code points
_MAX_TOKEN_ID = 0x10FFFF - _SURROGATES


# ---- the key of a request -----------------------------------------------------------------------------

def prefix_key(body: Any) -> str | None:
    """The routing key of an OpenAI request body (a dict), or None (routed by load alone).

    Chat completions: the `messages`, each as compact JSON with sorted keys, one per line, so that a
    conversation's key starts with the key of every earlier turn. Completions: the `prompt`, the first
    of a batch: text as it is, token ids as one character each. The three kinds never match each other."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        parts, size = [], 1
        for message in messages:
            try:
                part = json.dumps(message, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError):
                return None
            parts.append(part)
            size += len(part) + 1
            if size > MAX_KEY_CHARS:
                break
        return ("m" + "\n".join(parts))[:MAX_KEY_CHARS]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: they all go to one replica, chosen by the first
    if isinstance(prompt, str) and prompt:
        return ("s" + prompt)[:MAX_KEY_CHARS]
    if isinstance(prompt, list) and prompt:
        ids = prompt[:MAX_KEY_CHARS - 1]
        if not all(type(t) is int and 0 <= t <= _MAX_TOKEN_ID for t in ids):
            return None  # the replica refuses it anyway
        return "i" + "".join(chr(t) if t < 0xD800 else chr(t + _SURROGATES) for t in ids)
    return None


def request_key(pending_request: PendingRequest | None) -> str | None:
    """The key of a request Ray routes: an argument's `prefix_key` (ray_app.ForwardedRequest's), or the
    key of an argument that is an OpenAI request body (a deployment called with the parsed JSON)."""
    if pending_request is None:
        return None
    for arg in (*(pending_request.args or ()), *(pending_request.kwargs or {}).values()):
        key = getattr(arg, "prefix_key", None)
        if isinstance(key, str):
            return key or None
        if isinstance(arg, dict):
            return prefix_key(arg)
    return None


# ---- the index ----------------------------------------------------------------------------------------

class PrefixIndex:
    """Which replicas were sent which key prefixes: per replica, the chained hashes of a key's whole blocks
    (block i's hash covers blocks 0..i), in one LRU bounded to `max_chars` characters of keys in all.

    A key's blocks are refreshed last to first, so that an earlier block is never dropped before a later
    one: what a replica holds of a key is always a prefix of it."""

    def __init__(self, max_chars: int = DEFAULT_INDEX_CHARS, block: int = BLOCK):
        if max_chars < block:
            raise ValueError(f"index_chars must be at least {block}, got {max_chars}")
        self.block, self.max_entries = block, max_chars // block
        self._entries: OrderedDict[int, None] = OrderedDict()
        self._slots: dict[Hashable, int] = {}  # replica -> its slot in an entry
        self._owners: dict[int, Hashable] = {}  # slot -> replica
        self._held: dict[Hashable, int] = {}  # replica -> entries it holds
        self._next_slot = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _hashes(self, key: str) -> Iterator[int]:
        h, block = 0, self.block
        for start in range(0, min(len(key), MAX_KEY_CHARS) - block + 1, block):
            h = hash((h, key[start:start + block])) & _MASK
            yield h << _SLOT_BITS

    def held(self, replica: Hashable) -> int:
        """Characters of keys the index holds for `replica`."""
        return self._held.get(replica, 0) * self.block

    def match(self, key: str, replicas: Iterable[Hashable]) -> dict[Hashable, int]:
        """For each of `replicas`, how many leading characters of `key` it was sent (whole blocks)."""
        depth = dict.fromkeys(replicas, 0)
        live = {r: self._slots[r] for r in depth if r in self._slots}
        matched = 0
        for h in self._hashes(key):
            live = {r: slot for r, slot in live.items() if h | slot in self._entries}
            if not live:
                break
            matched += self.block
            for r in live:
                depth[r] = matched
        return depth

    def insert(self, key: str, replica: Hashable) -> None:
        """`replica` was sent `key`: its blocks become the most recent, the oldest entries past the bound go."""
        slot = self._slots.get(replica)
        if slot is None:
            slot = self._slot_for(replica)
        entries = self._entries
        for h in reversed(list(self._hashes(key))):
            entry = h | slot
            if entry in entries:
                entries.move_to_end(entry)
            else:
                entries[entry] = None
                self._held[replica] += 1
        while len(entries) > self.max_entries:
            entry, _ = entries.popitem(last=False)
            self._held[self._owners[entry & ((1 << _SLOT_BITS) - 1)]] -= 1

    def remove(self, replica: Hashable) -> None:
        """Forget a replica that has gone: its entries go with it, and its slot may serve another replica."""
        slot = self._slots.pop(replica, None)
        if slot is None:
            return
        mask = (1 << _SLOT_BITS) - 1
        for entry in [e for e in self._entries if e & mask == slot]:
            del self._entries[entry]
        del self._owners[slot], self._held[replica]

    def replicas(self) -> list[Hashable]:
        return list(self._slots)

    def _slot_for(self, replica: Hashable) -> int:
        if len(self._slots) >= 1 << _SLOT_BITS:
            raise RuntimeError("too many replicas for the prefix index")
        while self._next_slot in self._owners:
            self._next_slot = (self._next_slot + 1) % (1 << _SLOT_BITS)
        slot = self._next_slot
        self._next_slot = (slot + 1) % (1 << _SLOT_BITS)
        self._slots[replica], self._owners[slot], self._held[replica] = slot, replica, 0
        return slot


class PrefixPolicy:
    """The router's choice, apart from Ray: the index and its thresholds (the module docstring's rules 1-3)."""

    def __init__(self, min_match: int = DEFAULT_MIN_MATCH, match_ratio: float = DEFAULT_MATCH_RATIO,
                 max_imbalance: float = DEFAULT_MAX_IMBALANCE, index_chars: int = DEFAULT_INDEX_CHARS):
        for name, value in (("min_match", min_match), ("index_chars", index_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not 0 <= match_ratio <= 1:
            raise ValueError(f"match_ratio must be between 0 and 1, got {match_ratio!r}")
        if not max_imbalance >= 0:
            raise ValueError(f"max_imbalance must be at least 0, got {max_imbalance!r}")
        self.min_match, self.match_ratio, self.max_imbalance = max(min_match, 1), match_ratio, max_imbalance
        self.index = PrefixIndex(index_chars)

    def affine(self, key: str | None, replicas: list[Hashable],
               queue_len: Callable[[Hashable], int | None] = lambda replica: None) -> list[Hashable]:
        """The replicas to try first for `key`: those sent its longest prefix, if substantial and not too
        busy (queue_len: a replica's ongoing requests, None if unknown); [] to route by load alone."""
        if not key or not replicas:
            return []
        depth = self.index.match(key, replicas)
        best = max(depth.values())
        if best < max(self.min_match, self.match_ratio * min(len(key), MAX_KEY_CHARS)):
            return []
        chosen = [r for r in replicas if depth[r] == best]
        known = [q for q in map(queue_len, replicas) if q is not None]
        mine = [q for q in map(queue_len, chosen) if q is not None]
        if known and mine and min(mine) - min(known) > self.max_imbalance:
            return []
        return chosen

    def spread(self, replicas: list[Hashable]) -> list[Hashable]:
        """`replicas` with those holding the fewest prefixes first (a tie in queue length goes to the first)."""
        return sorted(replicas, key=self.index.held)


# ---- the Ray Serve request router ---------------------------------------------------------------------

class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's request router with prefix affinity (the module docstring). Its options, as
    `RequestRouterConfig(request_router_kwargs=...)`: min_match, match_ratio, max_imbalance, index_chars."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = PrefixPolicy()  # initialize_state replaces it with the deployment's options

    def initialize_state(self, min_match: int = DEFAULT_MIN_MATCH, match_ratio: float = DEFAULT_MATCH_RATIO,
                         max_imbalance: float = DEFAULT_MAX_IMBALANCE, index_chars: int = DEFAULT_INDEX_CHARS):
        self.policy = PrefixPolicy(min_match, match_ratio, max_imbalance, index_chars)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        fallback = self._power_of_two_choices(pending_request)
        key = request_key(pending_request)
        if key is None or not candidate_replicas:
            return fallback
        by_id = {r.replica_id: r for r in candidate_replicas}
        affine = self.policy.affine(key, list(by_id), self.replica_queue_len_cache.get)
        return [[by_id[i] for i in affine], *fallback] if affine else fallback

    def _power_of_two_choices(self, pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """Ray's default (PowerOfTwoChoicesRequestRouter's choice), the pair in the order policy.spread gives."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            candidates = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            candidates = self.apply_locality_routing(pending_request=pending_request)
        if not candidates:
            return []
        chosen = random.sample(list(candidates), min(2, len(candidates)))
        replicas = self.curr_replicas
        return [[replicas[i] for i in self.policy.spread(chosen) if i in replicas]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = request_key(pending_request)
        if key is not None:
            self.policy.index.insert(key, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {r.replica_id for r in replicas}
        for replica_id in self.policy.index.replicas():
            if replica_id not in current:
                self.policy.index.remove(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.index.remove(replica_id)
