"""Continuous batching: one step loop drives the decoder for every running request.

The loop runs on its own thread, so onnxruntime never blocks an event loop. Between two steps it
admits waiting requests: their prompts are prefilled together and their states join the running
batch (`DecoderState.join`, `RecurrentState.join`); a request that ends, or whose client went
away, leaves before the next step and its rows are dropped from the state. Each row samples from
its own generator seeded by its request, so a request gets the tokens it would get alone.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..decoder import Decoder
from ..errors import RuntimeInputError
from ..generate import RowProgress, Sampling, choose


class Overloaded(Exception):
    """Every running slot and every queue place is taken: the server answers 429."""


class EngineStopped(Exception):
    """The step loop has stopped (shut down, or died of an error): the server answers 503."""


@dataclass(frozen=True)
class Completion:
    """What one prompt asks for (already checked against the model)."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stops: Sequence[Sequence[int]] = ()
    eos_id: int | None = None


@dataclass(frozen=True)
class Tokens:
    """Tokens that are final and safe to show (a tail that may become a stop sequence is held back)."""

    ids: list[int]


@dataclass(frozen=True)
class Finished:
    """The request ended: reason "stop" (a stop sequence or id, not shown) or "length"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request cannot go on: the step loop died (status 500) or the server is stopping (503)."""

    message: str
    status: int = 500


Event = Tokens | Finished | Failed


@dataclass(eq=False)
class Request:
    """A completion in the engine.

    channel: called on the step loop's thread with the (request, Event) pairs of one step for every
    request that shares it (one call per step, not per token: a server hands them to its event loop
    in one wake-up); tag: whatever the receiver needs to route an event (e.g. its queue).
    """

    completion: Completion
    channel: Callable[[list[tuple["Request", Event]]], None]
    tag: object = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client has gone: the request leaves the batch before the next step."""
        self.cancelled = True


class _Row:
    """A running request: its progress, its sampling stream and its timing."""

    def __init__(self, request: Request, limit: int | None):
        c = request.completion
        self.request = request
        self.progress = RowProgress(len(c.prompt), c.max_tokens, c.eos_id, c.stops, limit)
        self.rng = np.random.default_rng(c.seed)
        self.last: float | None = None


REASONS = {"eos": "stop", "stop_sequence": "stop", "max_new_tokens": "length", "max_seq_len": "length"}


class NoMetrics:
    """What the engine reports to; the server passes its Prometheus metrics instead."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class Engine:
    """The step loop over one `Decoder`, shared by every request.

    max_batch: requests running at once (rows of a step); max_queue: requests waiting beyond them;
    max_prefill_tokens: prompt tokens admitted between two steps (at least one prompt), which bounds
    how long a burst of arrivals stalls the streams already running.
    """

    def __init__(self, decoder: Decoder, max_batch: int = 32, max_queue: int = 256, metrics=None,
                 max_prefill_tokens: int = 1024):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise RuntimeInputError(f"max_batch and max_prefill_tokens must be >= 1 and max_queue >= 0, got "
                                    f"{max_batch}, {max_prefill_tokens} and {max_queue}")
        self.decoder, self.max_batch, self.max_queue, self.max_prefill_tokens = decoder, max_batch, max_queue, max_prefill_tokens
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.limit = decoder.config["max_seq_len"] if decoder.bounded else None
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._state = None
        self._logits: np.ndarray | None = None
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
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue `requests` together, or none of them: Overloaded when they do not fit."""
        with self._wake:
            if not self.alive:
                raise EngineStopped(self.error or "the step loop is not running")
            if len(self._rows) + len(self._waiting) + len(requests) > self.max_batch + self.max_queue:
                raise Overloaded(f"{len(self._rows)} requests running and {len(self._waiting)} waiting: the server is full")
            self._waiting.extend(requests)
            self._wake.notify()

    # --- the step loop ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return self._fail_all(Failed("the server is shutting down", 503))
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._advance()
                self._flush()
        except Exception as e:  # the loop is dead: fail everyone still here, and say why (health turns 503)
            self.error = f"the step loop stopped: {type(e).__name__}: {e}"
            self._fail_all(Failed(self.error))

    def _fail_all(self, event: Failed) -> None:
        with self._wake:
            left = [row.request for row in self._rows] + list(self._waiting)
            self._rows, self._state = [], None
            self._waiting.clear()
        for request in left:
            self._tell(request, event)
        self._flush()

    def _admit(self) -> list[Request] | None:
        """Waiting requests that fit in the batch (blocks while there is nothing to do); None: stop."""
        with self._wake:
            while not self._stopping and not self._rows and not self._waiting:
                self._wake.wait()
            if self._stopping:
                return None
            admitted, tokens = [], 0
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                length = len(self._waiting[0].completion.prompt)
                if admitted and tokens + length > self.max_prefill_tokens:
                    break
                request = self._waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
                    tokens += length
            return admitted

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the new prompts in one call and join their rows to the running batch."""
        try:
            logits, state = self.decoder.prefill([r.completion.prompt for r in requests])
        except RuntimeInputError as e:  # checked on arrival, so not expected; the others keep running
            for request in requests:
                self._tell(request, Failed(str(e)))
            return
        with self._wake:
            if self._state is None:
                self._state, self._logits = state, logits
            else:
                self._state, self._logits = self._state.join(state), np.concatenate([self._logits, logits])
            self._rows.extend(_Row(r, self.limit) for r in requests)

    def _advance(self) -> None:
        """Sample one token per row, let the rows that ended leave, and step the rest."""
        now = time.perf_counter()
        keep, tokens = [], []
        for i, row in enumerate(self._rows):
            if row.request.cancelled:
                self.metrics.finished("abort", len(row.request.completion.prompt), row.progress.sampled)
                continue
            token = int(choose(self._logits[i : i + 1], row.request.completion.sampling, [row.rng])[0])
            if row.last is None:
                self.metrics.first_token(now - row.request.arrived)
            else:
                self.metrics.next_token(now - row.last)
            row.last = now
            shown = row.progress.add(token)
            if shown:
                self._tell(row.request, Tokens(shown))
            if row.progress.reason:
                self._finish(row)
            else:
                keep.append(i)
                tokens.append(token)
        if len(keep) < len(self._rows):
            with self._wake:
                self._rows = [self._rows[i] for i in keep]
                self._state = self._state.rows(np.array(keep, np.int64)) if keep else None
                self._logits = self._logits[keep] if keep else None
        if self._rows:
            self._logits, self._state = self.decoder.step(np.array(tokens, np.int64), self._state)

    def _finish(self, row: _Row) -> None:
        reason = REASONS[row.progress.reason]
        prompt_tokens = len(row.request.completion.prompt)
        self.metrics.finished(reason, prompt_tokens, row.progress.sampled)
        self._tell(row.request, Finished(reason, prompt_tokens, row.progress.sampled))

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
