"""What a request asks of the engine and what the engine tells it back.

`Completion` is one sample's request (already checked against the model); `Request` carries it
through the engine with the channel its events go to. Events: `Prompt` (an echoed prompt's
log-probabilities), `Tokens`, then `Finished` or `Failed`. The exceptions say why `Engine.submit`
refuses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..generate import Sampling
from ..logprobs import TokenLogprob


class Overloaded(Exception):
    """Every running slot and every queue place is taken: the server answers 429."""


class TooLarge(Exception):
    """The request could never be admitted (its state exceeds the budget, or it has more rows than
    a batch holds): the server answers 400."""


class EngineStopped(Exception):
    """The step loop has stopped (shut down, or died of an error): the server answers 503."""


@dataclass(frozen=True)
class Completion:
    """What one prompt asks for (already checked against the model).

    max_tokens 0 samples nothing (scoring the prompt: `echo`). logprobs: how many of the most likely
    tokens to list at each generated position (0: the chosen token's alone), None for no
    log-probabilities. echo: send the prompt's log-probabilities first (with logprobs set). score:
    track the cumulative log-probability (for best_of) even without logprobs. stop_texts: strings
    that end the completion when its decoded text reaches them (a model with a tokenizer, whose
    tokens need not line up with the strings), read through `vocabulary`.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stops: Sequence[Sequence[int]] = ()
    eos_id: int | None = None
    logprobs: int | None = None
    echo: bool = False
    score: bool = False
    stop_texts: Sequence[str] = ()
    vocabulary: object = None


@dataclass(frozen=True)
class Prompt:
    """The prompt's log-probabilities (first event of an `echo` completion): None for the first token."""

    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True)
class Tokens:
    """Tokens that are final and safe to show (a tail that may become a stop sequence is held back).

    logprobs: one entry per id when asked for, plus a last one for the eos token that ended the
    completion (sampled and scored, but not shown as text).
    """

    ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Finished:
    """The request ended: reason "stop" (a stop sequence or id, not shown) or "length"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cumulative_logprob: float | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed


@dataclass(frozen=True)
class Failed:
    """The request cannot go on: the step loop died (status 500) or the server is stopping (503)."""

    message: str
    status: int = 500


Event = Prompt | Tokens | Finished | Failed


@dataclass(eq=False)
class Request:
    """A completion in the engine.

    channel: called on the step loop's thread with the (request, Event) pairs of one step for every
    request that shares it (one call per step, not per token: a server hands them to its event loop
    in one wake-up); tag: whatever the receiver needs to route an event (e.g. its queue); group:
    requests submitted together with the same group (and prompt) share one prefill.
    """

    completion: Completion
    channel: Callable[[list[tuple["Request", Event]]], None]
    tag: object = None
    group: object = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client has gone: the request leaves the batch before the next step."""
        self.cancelled = True
