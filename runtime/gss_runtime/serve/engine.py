"""Continuous batching: one step loop drives the decoder for every running request.

The loop runs on its own thread, so onnxruntime never blocks an event loop. Between two steps it
admits waiting requests: their prompts are prefilled together and their states join a running
batch (`DecoderState.repack`, `RecurrentState.repack`); a request that ends, or whose client went
away, leaves before the next step and its rows are dropped from the state. Each row samples from
its own generator seeded by its request, so a request gets the tokens it would get alone.

Requests submitted together under one `group` (a prompt's n samples) share one prefill: the
prompt's state is computed once and copied into their rows.

Prefix caching (`prefix_cache.py`): a prompt whose start the engine has held before (the end of an earlier
prompt or completion) starts from that state's snapshot and computes only its rest, alone, before its rows
join a batch like any others'; echoed prompts need every position's logits, so they are always prefilled.

Memory: with a `state_memory` budget, a request is admitted only when the state its batch can grow
to fits (`budget.py`); otherwise it waits. GatedDsConvLM's requests run in up to `MAX_BATCHES`
batches, each new request joining the one where it adds the least state, so a short request does
not pay for the slots of a long one.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..decoder import Decoder, DecoderState, headroom
from ..errors import RuntimeInputError
from ..generate import RowProgress, choose
from ..logprobs import TokenLogprob, token_logprobs
from ..vocabulary import StopText
from .budget import StateCost, lifetime_feeds, probe_step_memory
from .prefix_cache import DEFAULT_CAPACITY, Plan, PrefixCache
from .requests import (Completion, EngineStopped, Event, Failed, Finished, Overloaded, Prompt, Request, Tokens,
                       TooLarge)

__all__ = ["Completion", "Engine", "EngineStopped", "Event", "Failed", "Finished", "Overloaded", "Prompt", "Request",
           "Tokens", "TooLarge"]

# batches stepped separately (appended states only): each costs a decoder call per step, and lets
# rows of very different lengths avoid sharing slots
MAX_BATCHES = 4
# a request joins a running batch unless a batch of its own costs less than this share of joining: rows of
# similar lengths share batches, so one is left for rows of another length
NEW_BATCH_SHARE = 0.8


class _Row:
    """A running request: its progress, its sampling stream, what it still feeds, and its timing."""

    def __init__(self, request: Request, limit: int | None, cached: int = 0):
        c = request.completion
        self.request, self.cached = request, cached  # cached: prompt tokens taken from a snapshot
        self.fed: list[int] = []  # sampled tokens fed to the state so far (all but the newest)
        self.progress = RowProgress(len(c.prompt), c.max_tokens, c.eos_id, c.stops, limit)
        self.rng = np.random.default_rng(c.seed)
        self.feeds = lifetime_feeds(len(c.prompt), c.max_tokens, limit)  # tokens still to feed after the prompt
        self.scored = c.logprobs is not None or c.score
        self.logprobs: list[TokenLogprob] = []  # one per token of progress.made
        self.cumulative = 0.0
        self.last: float | None = None
        # stop strings: the text is decoded as it comes (the reply trims it at the string, from the same tokens)
        self.stop_text = (c.vocabulary.stream(), StopText(c.stop_texts)) if c.stop_texts else None

    def reached_stop_text(self, token: int) -> bool:
        """Whether the text, with `token`'s, has reached one of the completion's stop strings."""
        if self.stop_text is None or self.progress.reason:
            return False
        text, stops = self.stop_text
        return stops.add(text.add([token]))[1]


class _Batch:
    """Rows stepped together by one decoder call: their state and the logits they sample from next."""

    def __init__(self, rows: list[_Row], state, logits: np.ndarray):
        self.rows, self.state, self.logits = rows, state, logits

    def reach(self) -> int:
        """Slots this batch's state can grow to (0 for a fixed-size state)."""
        return _slots(self.state) + max((r.feeds for r in self.rows), default=0) if _slots(self.state) else 0


def _ready(state, feeds: int) -> bool:
    """Whether a one-row state can step as a batch as it is: a fixed-size one always; an appended one whose
    buffers it extends itself with exactly the room `_room` keeps for `feeds` tokens to come."""
    if not isinstance(state, DecoderState):
        return True
    return state.slots.filled == state.length and state.slots.capacity - state.length == _room(state.length, feeds)


def _room(slots: int, feeds: int) -> int:
    """Free slots a batch of `slots` keeps for `feeds` tokens to come. The budget counts every slot a batch can
    grow to, but the buffers keep only `headroom` and grow by as much when it runs out: a step multiplies the
    room's zeros too (16 streams of 1,024 tokens after 128-token prompts: 1.11x the tokens per second of
    reserving all 1,023 slots at once)."""
    return headroom(slots, feeds)


def _slots(state) -> int:
    """An appended state's slots; 0 for a fixed-size (recurrent) one."""
    return state.length if isinstance(state, DecoderState) else 0


@dataclass
class _Unit:
    """Requests that share one prompt's prefill (a prompt's n samples)."""

    requests: list[Request]
    plan: Plan | None = None  # where its prefill starts (None: no prefix cache, or an echoed prompt)

    @property
    def completion(self) -> Completion:
        return self.requests[0].completion

    @property
    def live(self) -> list[Request]:
        return [r for r in self.requests if not r.cancelled]


REASONS = {"eos": "stop", "stop_sequence": "stop", "max_new_tokens": "length", "max_seq_len": "length"}


class NoMetrics:
    """What the engine reports to; the server passes its Prometheus metrics instead."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def prompt_cache(self, cached_tokens: int) -> None: ...  # a prompt prefilled with the cache on (0: a miss)


class Engine:
    """The step loop over one `Decoder`, shared by every request.

    max_batch: requests running at once (rows of a step); max_queue: requests waiting beyond them;
    max_prefill_tokens: prompt tokens admitted between two steps (at least one prompt), which bounds
    how long a burst of arrivals stalls the streams already running (tokens computed: a cached prefix is
    not); state_memory: bytes of decoder state the running requests may hold (None: no budget);
    prefix_cache_memory: bytes of the prefix cache's snapshots, a budget of its own (None: no cache).
    """

    def __init__(self, decoder: Decoder, max_batch: int = 32, max_queue: int = 256, metrics=None,
                 max_prefill_tokens: int = 1024, state_memory: int | None = None,
                 prefix_cache_memory: int | None = DEFAULT_CAPACITY):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1 or any(
                m is not None and m < 1 for m in (state_memory, prefix_cache_memory)):
            raise RuntimeInputError(f"max_batch, max_prefill_tokens, state_memory and prefix_cache_memory must be >= 1 "
                                    f"and max_queue >= 0, got {max_batch}, {max_prefill_tokens}, {state_memory}, "
                                    f"{prefix_cache_memory} and {max_queue}")
        self.decoder, self.max_batch, self.max_queue, self.max_prefill_tokens = decoder, max_batch, max_queue, max_prefill_tokens
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.limit = decoder.config["max_seq_len"] if decoder.bounded else None
        work = probe_step_memory(decoder) if state_memory is not None else 0
        self.cost, self.state_memory = StateCost.of(decoder, work), state_memory
        self.max_batches = MAX_BATCHES if decoder.bounded else 1
        self.prefix_cache = PrefixCache(decoder, prefix_cache_memory) if prefix_cache_memory is not None else None
        # (what the running batches can grow to: the budget's measure, what their buffers hold now), replaced
        # whole so that a reader sees one moment
        self.state_bytes = (0, 0)
        self._waiting: collections.deque[_Unit] = collections.deque()
        self._batches: list[_Batch] = []
        self._outbox: list[tuple[Request, Event]] = []  # this step's events, sent together by _flush
        self._wake = threading.Condition()
        self._stopping = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="gss-step-loop", daemon=True)

    # --- what the server's threads call -------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    @property
    def waiting(self) -> int:
        return sum(len(u.requests) for u in self._waiting)

    def reservation(self, completion: Completion, rows: int = 1) -> int:
        """Bytes of state `rows` samples of `completion` can grow to, alone in a batch."""
        if completion.max_tokens == 0:
            return 0
        length, feeds = self._extent(completion)
        return self.cost.bytes(rows, length + feeds)

    def _extent(self, c: Completion) -> tuple[int, int]:
        """A request's prefilled state alone: (slots, tokens it still feeds after its prompt)."""
        return len(c.prompt) + 1, lifetime_feeds(len(c.prompt), c.max_tokens, self.limit)

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue `requests` together, or none of them: Overloaded when they do not fit in the queue,
        TooLarge when one of them could never run."""
        units: list[_Unit] = []
        for r in requests:  # consecutive requests of one group share a prefill
            if units and r.group is not None and units[-1].requests[-1].group is r.group:
                units[-1].requests.append(r)
            else:
                units.append(_Unit([r]))
        for u in units:
            if len(u.requests) > self.max_batch:
                raise TooLarge(f"{len(u.requests)} samples of one prompt; this server runs at most {self.max_batch} at once")
            need = self.reservation(u.completion, len(u.requests))
            if self.state_memory is not None and need > self.state_memory:
                raise TooLarge(f"the request's decoder state can reach {need:,} bytes ({len(u.completion.prompt)} prompt "
                               f"tokens + max_tokens {u.completion.max_tokens}, x{len(u.requests)}); this server's "
                               f"--state-memory is {self.state_memory:,}: ask for fewer tokens")
        with self._wake:
            if not self.alive:
                raise EngineStopped(self.error or "the step loop is not running")
            if self.running + self.waiting + len(requests) > self.max_batch + self.max_queue:
                raise Overloaded(f"{self.running} requests running and {self.waiting} waiting: the server is full")
            self._waiting.extend(units)
            self._wake.notify()

    # --- the step loop ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return self._fail_all(Failed("the server is shutting down", 503))
                for target, units in admitted.items():
                    self._prefill(target, units)
                for batch in list(self._batches):
                    self._advance(batch)
                self._account()
                self._flush()
        except Exception as e:  # the loop is dead: fail everyone still here, and say why (health turns 503)
            self.error = f"the step loop stopped: {type(e).__name__}: {e}"
            self._fail_all(Failed(self.error))

    def _fail_all(self, event: Failed) -> None:
        with self._wake:
            left = [row.request for b in self._batches for row in b.rows] + [r for u in self._waiting for r in u.requests]
            self._batches = []
            self._waiting.clear()
        for request in left:
            self._tell(request, event)
        self._flush()

    @property
    def reserved_bytes(self) -> int:
        return self.state_bytes[0]

    @property
    def held_bytes(self) -> int:
        return self.state_bytes[1]

    @property
    def prefix_cache_usage(self) -> tuple[int, int, int]:
        """The prefix cache's (bytes, entries, capacity), read together; zeros without a cache."""
        cache = self.prefix_cache
        return (*cache.usage, cache.capacity) if cache is not None else (0, 0, 0)

    def _account(self) -> None:
        self.state_bytes = (sum(self.cost.bytes(len(b.rows), b.reach()) for b in self._batches),
                            sum(b.state.held_bytes + self.cost.work_bytes * len(b.rows) for b in self._batches))

    def _admit(self) -> dict | None:
        """Waiting units placed in batches: {batch index, or a new key: [units]} (blocks while there is
        nothing to do); None: stop.

        A unit joins the batch where its state adds the least (or a new batch). When the head of the
        queue does not fit the budget, a later unit may overtake it only if it fits and its max_tokens
        ends before any running request can, so it never holds memory the head could have had.
        """
        with self._wake:
            while not self._stopping and not self._batches and not self._waiting:
                self._wake.wait()
            if self._stopping:
                return None
            # what each batch would look like: [rows, length, most feeds left]; new batches appended
            plans = [[len(b.rows), _slots(b.state), max((r.feeds for r in b.rows), default=0)] for b in self._batches]
            reserved = sum(self.cost.bytes(n, length + feeds) for n, length, feeds in plans)
            rows, placed, blocked = self.running, {}, False
            longest: dict[int, int] = {}  # per prefill call (target batch): its longest prompt, which pads the others
            batched: collections.Counter[int] = collections.Counter()  # per call: its prompts (the others resume alone)
            resumed = 0  # tokens computed by prompts resumed from a snapshot
            soonest = min((r.progress.max_new_tokens - r.progress.sampled for b in self._batches for r in b.rows), default=0)
            for unit in list(self._waiting):
                live = unit.live
                if not live:
                    self._waiting.remove(unit)
                    continue
                c = unit.completion
                if rows + len(live) > self.max_batch:
                    break
                target, cost = self._place(plans, c, len(live))
                unit.plan = self.prefix_cache.plan(c.prompt) if self.prefix_cache is not None and not c.echo else None
                alone = None if unit.plan is None or unit.plan.cold else len(c.prompt) - unit.plan.start
                # a call's prompts are padded to its longest: what it computes, and holds, is rows x longest
                padded = {t: batched[t] * n for t, n in longest.items()}
                if alone is None:
                    padded[target] = (batched[target] + 1) * max(longest.get(target, 0), len(c.prompt))
                if placed and sum(padded.values()) + resumed + (alone or 0) > self.max_prefill_tokens:
                    break
                if self.state_memory is not None and reserved + cost > self.state_memory:
                    blocked = True  # the head waits for memory; later ones may overtake it within the rule above
                    continue
                if blocked and c.max_tokens > soonest:
                    continue
                self._waiting.remove(unit)
                unit.requests = live
                if c.max_tokens > 0:
                    self._apply(plans, target, c, len(live))
                    rows += len(live)
                reserved += cost
                if alone is None:
                    longest[target] = max(longest.get(target, 0), len(c.prompt))
                    batched[target] += 1
                else:
                    resumed += alone
                placed.setdefault(target, []).append(unit)
            return placed

    def _place(self, plans: list, c: Completion, k: int) -> tuple[int, int]:
        """The plan index (len(plans): a new batch) where k rows of `c` add the least state, and that cost."""
        if c.max_tokens == 0:
            return -1, 0  # scored only: no row
        length, feeds = self._extent(c)
        best = None
        for i, (n, plan_length, plan_feeds) in enumerate(plans):
            grown = self.cost.bytes(n + k, max(plan_length, length) + max(plan_feeds, feeds))
            cost = grown - self.cost.bytes(n, plan_length + plan_feeds)
            if best is None or cost < best[1]:
                best = (i, cost)
        alone = self.cost.bytes(k, length + feeds)
        if len(plans) < self.max_batches and (best is None or alone < NEW_BATCH_SHARE * best[1]):
            return len(plans), alone
        return best

    def _apply(self, plans: list, target: int, c: Completion, k: int) -> None:
        length, feeds = self._extent(c)
        if target == len(plans):
            plans.append([k, length, feeds])
        else:
            n, plan_length, plan_feeds = plans[target]
            plans[target] = [n + k, max(plan_length, length), max(plan_feeds, feeds)]

    def _prefill(self, target: int, units: list[_Unit]) -> None:
        """Compute the units' prompts (cold ones in one call, those resumed from a snapshot one by one); their
        rows join batch `target` (or a new one)."""
        cold = [u for u in units if u.plan is None or u.plan.cold]
        warm = [u for u in units if u.plan is not None and not u.plan.cold]
        new = target == -1 or target >= len(self._batches)
        # prompts that become a batch of their own get its spare slots at once, so the batch steps in their
        # buffers (no copy): one resumed request, or cold prompts prefilled together
        alone = new and not cold and len(warm) == 1 and len(warm[0].requests) == 1
        room = (_room(max(self._extent(u.completion)[0] for u in cold), max(self._extent(u.completion)[1] for u in cold))
                if new and cold and not warm else 0)
        parts = [self._prefill_together(cold, room)] if cold else []
        parts += [self._resume(u, _room(*self._extent(u.completion)) if alone else 0) for u in warm]
        parts = [p for p in parts if p is not None and p[1]]  # (state, fork: its rows for ours, their logits, _Rows)
        if not parts:
            return
        state, fork = parts[0][0], np.array(parts[0][1])
        others = [s if len(f) == 1 else s.rows(np.array(f)) for s, f, _, _ in parts[1:]]
        rows = [row for p in parts for row in p[3]]
        new_logits = np.concatenate([p[2] for p in parts])
        with self._wake:
            if new:
                feeds = max(r.feeds for r in rows)
                as_is = len(parts) == 1 and np.array_equal(fork, np.arange(len(state.tokens))) and _ready(state, feeds)
                if not as_is:
                    slots = max([_slots(state), *(_slots(o) for o in others)])
                    state = state.repack(fork, others, _room(slots, feeds), consume=True)
                self._batches.append(_Batch(rows, state, new_logits))
            else:
                batch = self._batches[target]
                forked = state.repack(fork, others, consume=True)
                room = _room(max(_slots(batch.state), _slots(forked)), max(r.feeds for r in batch.rows + rows))
                batch.state = batch.state.repack(np.arange(len(batch.rows)), forked, room, consume=True)
                batch.rows += rows
                batch.logits = np.concatenate([batch.logits, new_logits])

    def _prefill_together(self, units: list[_Unit], room: int = 0):
        """The units' prompts in one prefill call, each end snapshotted, the state with `room` free slots:
        (state, fork, logits, rows), None if it failed."""
        every = any(u.completion.echo for u in units)
        try:
            logits, state = self.decoder.prefill([u.completion.prompt for u in units], every=every, room=room)
        except RuntimeInputError as e:  # checked on arrival, so not expected; the others keep running
            return self._fail(units, e)
        longest = logits.shape[1] if every else 0
        last = logits[:, -1] if every else logits
        fork, rows = [], []
        for i, unit in enumerate(units):
            c = unit.completion
            if self.prefix_cache is not None:
                self.prefix_cache.store(c.prompt, state, i, last[i])
                self.metrics.prompt_cache(0)
            if c.echo:
                self._echo(unit, logits[i, longest - len(c.prompt) :])
            if c.max_tokens == 0:
                for request in unit.requests:
                    self._finish_request(request, "length", 0, None)
                continue
            fork += [i] * len(unit.requests)
            rows += [_Row(r, self.limit) for r in unit.requests]
        return state, fork, last[fork], rows

    def _resume(self, unit: _Unit, spare: int = 0):
        """One prompt computed from its plan's snapshot: (its one-row state, fork, logits, rows), None if it failed."""
        plan, k = unit.plan, len(unit.requests)
        try:
            logits, state = self.prefix_cache.resume(plan, unit.completion.prompt, spare)
        except RuntimeInputError as e:
            return self._fail([unit], e)
        self.metrics.prompt_cache(plan.start)
        return state, [0] * k, np.repeat(logits[None], k, axis=0), [_Row(r, self.limit, plan.start) for r in unit.requests]

    def _fail(self, units: list[_Unit], error: Exception) -> None:
        for unit in units:
            for request in unit.requests:
                self._tell(request, Failed(str(error)))

    def _echo(self, unit: _Unit, logits: np.ndarray) -> None:
        """The prompt's log-probabilities from its prefill logits: position j's logits score token j + 1."""
        c = unit.completion
        entries = [None] + token_logprobs(logits[:-1], c.prompt[1:], c.logprobs or 0) if c.logprobs is not None else []
        for request in unit.requests:
            self._tell(request, Prompt(entries))

    def _advance(self, batch: _Batch) -> None:
        """Sample one token per row, let the rows that ended leave, and step the rest."""
        now = time.perf_counter()
        keep, tokens = [], []
        for i, row in enumerate(batch.rows):
            c = row.request.completion
            if row.request.cancelled:
                self.metrics.finished("abort", len(c.prompt), row.progress.sampled)
                continue
            logits = batch.logits[i : i + 1]
            token = int(choose(logits, c.sampling, [row.rng])[0])
            if row.last is None:
                self.metrics.first_token(now - row.request.arrived)
            else:
                self.metrics.next_token(now - row.last)
            row.last = now
            self._take(row, token, logits)
            if row.reached_stop_text(token):
                row.progress.reason = "stop_sequence"
            if row.progress.reason:
                if self.prefix_cache is not None and row.fed:  # the state after what it fed: a next turn's prefix
                    self.prefix_cache.store(np.concatenate([np.asarray(c.prompt, np.int64), row.fed]), batch.state, i,
                                            batch.logits[i])
                self._finish_request(row.request, REASONS[row.progress.reason], row.progress.sampled,
                                     row.cumulative if row.scored else None, row.cached)
            else:
                keep.append(i)
                tokens.append(token)
        if not keep:
            with self._wake:
                self._batches.remove(batch)
            return
        if len(keep) < len(batch.rows):
            with self._wake:
                batch.rows = [batch.rows[i] for i in keep]
                batch.logits = batch.logits[keep]
                batch.state = batch.state.repack(np.array(keep), spare=_room(_slots(batch.state), max(r.feeds for r in batch.rows)), consume=True)
        state, room = batch.state, 0
        if isinstance(state, DecoderState) and state.length >= state.slots.capacity:  # the room ran out: grow, within the extent
            room = _room(state.length + 1, max(r.feeds for r in batch.rows) - 1)
        batch.logits, batch.state = self.decoder.step(np.array(tokens, np.int64), state, room)
        for row, token in zip(batch.rows, tokens):
            row.feeds -= 1
            row.fed.append(token)

    def _take(self, row: _Row, token: int, logits: np.ndarray) -> None:
        """Add the sampled token to the row and send what became safe to show, with its log-probabilities."""
        c, progress = row.request.completion, row.progress
        entry = token_logprobs(logits, [token], c.logprobs or 0)[0] if row.scored else None
        if entry is not None:
            row.cumulative += entry.logprob
        start = progress.shown
        shown = progress.add(token)
        if c.logprobs is None:
            if shown:
                self._tell(row.request, Tokens(shown))
            return
        if progress.reason != "eos":
            row.logprobs.append(entry)
        del row.logprobs[len(progress.made):]  # a matched stop sequence is removed, with its entries
        entries = row.logprobs[start : start + len(shown)] + ([entry] if progress.reason == "eos" else [])
        if shown or entries:
            self._tell(row.request, Tokens(shown, entries))

    def _finish_request(self, request: Request, reason: str, sampled: int, cumulative: float | None,
                        cached: int = 0) -> None:
        prompt_tokens = len(request.completion.prompt)
        self.metrics.finished(reason, prompt_tokens, sampled)
        self._tell(request, Finished(reason, prompt_tokens, sampled, cumulative, cached))

    def _tell(self, request: Request, event: Event) -> None:
        self._outbox.append((request, event))

    def _flush(self) -> None:
        """Send this step's events, one call per channel; a channel that fails cancels its requests."""
        by_channel: dict = {}
        for request, event in self._outbox:
            by_channel.setdefault(request.channel, []).append((request, event))
        self._outbox = []
        for channel, items in by_channel.items():
            try:
                channel(items)
            except Exception:  # e.g. the server's event loop has closed: nobody is listening
                for request, _ in items:
                    request.cancel()
