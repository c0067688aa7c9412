"""Text generation on the decoder with state: one position per new token, numpy and onnxruntime only.

Sampling: greedy (temperature 0), temperature, top-k (or upstream's `filter_thres`:
k = int((1 - thres) * vocab)), top-p; each row draws from its own generator seeded with `seed`,
so a prompt gives the same tokens alone or anywhere in a batch. Stops per row at `eos_id`, at a
stop sequence (neither is included in the output), or after `max_new_tokens`. At `max_seq_len`
a row stops (`on_limit="stop"`, the default) or continues on a sliding window of the last
max_seq_len tokens (`on_limit="slide"`, what upstream's generate does: the window is re-read from
position 0 for each token past the limit, so those tokens cost a prefill each).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .decoder import Decoder, DecoderState, headroom
from .errors import RuntimeInputError
from .tokenizer import vocabulary_for
from .vocabulary import NoTextMapping, StopText

# eos_id's default: the tokenizer's end-of-text token when the export has a tokenizer, else none
EOS_FROM_TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    filter_thres: float | None = None

    def check(self, vocab: int) -> None:
        for name in ("temperature", "top_p", "filter_thres"):
            value = getattr(self, name)
            if value is not None and not _is_real(value):
                raise RuntimeInputError(f"{name} must be a number, got {value!r}")
        if self.top_k is not None and not _is_int(self.top_k):
            raise RuntimeInputError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise RuntimeInputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k:
            raise RuntimeInputError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RuntimeInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.filter_thres is not None and not (0 <= self.filter_thres < 1 and int((1 - self.filter_thres) * vocab) >= 1):
            raise RuntimeInputError(f"filter_thres must be in [0, 1) and keep at least one token, got {self.filter_thres}")
        if self.top_k is not None and self.filter_thres is not None:
            raise RuntimeInputError("give top_k or filter_thres, not both")


def choose(logits: np.ndarray, sampling: Sampling, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """logits (b, vocab) -> one token per row (b,) int64."""
    if sampling.temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    # shifted by the row's max before dividing: a tiny temperature then sends every other score to -inf
    # (greedy, as it should be) instead of overflowing them all to inf
    scores = logits.astype(np.float64)
    scores = (scores - scores.max(axis=-1, keepdims=True)) / sampling.temperature
    vocab = scores.shape[-1]
    k = sampling.top_k if sampling.filter_thres is None else int((1 - sampling.filter_thres) * vocab)
    if k is not None and k < vocab:
        kth = np.partition(scores, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= sampling.top_p  # mass before it already enough
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    draws = np.array([rng.random() for rng in rngs]) * cdf[:, -1]
    return np.minimum((cdf < draws[:, None]).sum(axis=-1), vocab - 1).astype(np.int64)


@dataclass
class TextGeneration:
    """One prompt's generated text (what `stream_text` yielded, joined), its ids and why it stopped."""

    text: str
    tokens: list[int]
    stop_reason: str
    generation: "Generation"  # its timings and state size


@dataclass
class Generation:
    """Generated ids per prompt (prompt excluded), why each stopped, and timings."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    texts: list[str] | None = None  # the tokens' text, for a model with text (a tokenizer, or bytes)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    state_bytes: int = 0
    timeline: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return sum(map(len, self.tokens)) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class Generator:
    """Greedy or sampled generation from a gss-export folder (needs its `decoder.onnx`).

    Prompts are ids, or text for a model with text: its export's tokenizer (`gss-export --tokenizer`),
    or UTF-8 bytes for a byte-level model. `vocabulary` maps between the two.
    provider, threads, backend, precision: as Decoder's.
    """

    def __init__(self, model, provider: str = "auto", threads: int | None = None, backend: str = "onnxruntime",
                 precision: str = "f32"):
        self.decoder = Decoder(model, provider=provider, threads=threads, backend=backend, precision=precision)
        self.config = self.decoder.config
        self.vocabulary = vocabulary_for(self.decoder.path.parent, self.config["num_tokens"])
        files = getattr(self.vocabulary, "files", None)
        self.eos_id: int | None = files.eos_token_id if files is not None else None

    def encode(self, prompts) -> list:
        """Text prompts (a string or a list of strings) -> ids; ids pass through."""
        if isinstance(prompts, str):
            return self._encode(prompts)
        if len(prompts) and all(isinstance(p, str) for p in prompts):
            return [self._encode(p) for p in prompts]
        return prompts

    def _encode(self, text: str) -> list[int]:
        try:
            ids = self.vocabulary.encode(text)
        except NoTextMapping as e:
            raise RuntimeInputError(f"{e}; give ids, or export the model with gss-export --tokenizer") from None
        if not ids:
            raise RuntimeInputError(f"the prompt {text!r} has no tokens")
        return ids

    def generate(self, prompts, max_new_tokens: int, on_token: Callable[[int, int], None] | None = None, **options) -> Generation:
        """Run `stream` to the end; `on_token(row, token)` sees each token as it is made. `texts` holds
        each row's text when the model has text."""
        prompts = self.encode(prompts)
        result = Generation([[] for _ in range(_batch(prompts))], [""] * _batch(prompts))
        for row, token in self.stream(prompts, max_new_tokens, result=result, **options):
            if on_token is not None:
                on_token(row, token)
        if self.vocabulary.text:
            result.texts = [self.vocabulary.decode(t) for t in result.tokens]
        return result

    def stream_text(self, prompt: str | Sequence[int], max_new_tokens: int, *, stop: Sequence[str] = (),
                    outcome: list | None = None, **options) -> Iterator[str]:
        """One prompt's text as it is made: each piece is final (a character split over tokens, or text a
        later token may still change, is held back), so the pieces joined equal the ids decoded at once.

        stop: strings that end the text (not included), found in the decoded text whatever the tokens;
        outcome: if given, gets the generated ids, the stop reason and the `Generation` (timings) appended
        at the end. `options`: as `stream`.
        """
        ids = self.encode(prompt)
        if not self.vocabulary.text:
            raise RuntimeInputError(f"this model has no text (num_tokens {self.config['num_tokens']}, no tokenizer): "
                                    "use stream or generate with ids")
        result = Generation([[]], [""])
        tokens = self.stream(ids, max_new_tokens, result=result, **options)
        text, stopper, reason = self.vocabulary.stream(), StopText(stop), ""
        try:
            for _, token in tokens:
                piece, hit = stopper.add(text.add([token]))
                if piece:
                    yield piece
                if hit:
                    reason = "stop_sequence"
                    break
            else:
                piece, hit = stopper.add(text.end())
                piece += "" if hit else stopper.end()
                reason = "stop_sequence" if hit else result.stop_reasons[0]
                if piece:
                    yield piece
        finally:
            tokens.close()
            if outcome is not None:
                outcome += [result.tokens[0], reason, result]

    def generate_text(self, prompt: str | Sequence[int], max_new_tokens: int, **options) -> TextGeneration:
        """`stream_text` to the end."""
        outcome: list = []
        text = "".join(self.stream_text(prompt, max_new_tokens, outcome=outcome, **options))
        return TextGeneration(text, *outcome)

    def stream(
        self,
        prompts,
        max_new_tokens: int,
        *,
        sampling: Sampling = Sampling(),
        seed: int | None = None,
        eos_id: int | None | str = EOS_FROM_TOKENIZER,
        stop_sequences: Sequence[Sequence[int]] = (),
        on_limit: str = "stop",
        result: Generation | None = None,
    ) -> Iterator[tuple[int, int]]:
        """Yield (row, token) as tokens are made. prompts: one id sequence or a list of them.

        eos_id: the token that ends a row (not yielded); by default the tokenizer's end-of-text token
        (none without a tokenizer); None: no end token. The options are checked here, when it is
        called, before anything is computed or yielded.
        """
        if eos_id == EOS_FROM_TOKENIZER:
            eos_id = self.eos_id
        batch = [list(prompts)] if _is_single(prompts) else [list(p) for p in prompts]
        vocab = self.config["num_tokens"]
        sampling.check(vocab)
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise RuntimeInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if on_limit not in ("stop", "slide"):
            raise RuntimeInputError(f"on_limit must be 'stop' or 'slide', got {on_limit!r}")
        if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < vocab):
            raise RuntimeInputError(f"eos id {eos_id!r} is not a token id in [0, {vocab})")
        if seed is not None and not (_is_int(seed) and seed >= 0):
            raise RuntimeInputError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(stop_sequences, (str, bytes)) or not all(
                isinstance(s, (list, tuple, np.ndarray)) and all(_is_int(t) for t in s) for s in stop_sequences):
            raise RuntimeInputError(f"stop_sequences must be a list of token id lists, got {stop_sequences!r}")
        stops = [[int(t) for t in s] for s in stop_sequences if len(s)]
        result = result if result is not None else Generation([[] for _ in batch], [""] * len(batch))
        return self._run(batch, max_new_tokens, sampling, seed, eos_id, stops, on_limit, result)

    def _run(self, batch, max_new_tokens, sampling, seed, eos_id, stops, on_limit, result) -> Iterator[tuple[int, int]]:
        limit = self.config["max_seq_len"]
        bounded = self.decoder.bounded  # a recurrent state has no limit on the context, only on each prompt
        rngs = [np.random.default_rng(seed) for _ in batch]  # one stream per row: batching does not change draws

        start = time.perf_counter()
        # room for the tokens still to be fed (all but the last sampled), up to the headroom a step reads cheaply:
        # the first steps never grow the state, and later growth copies it once per context / 8 tokens
        longest = max(len(p) for p in batch)
        logits, state = self.decoder.prefill(batch, room=headroom(longest, max_new_tokens - 1))
        result.prefill_seconds = time.perf_counter() - start
        cap = limit if bounded and on_limit == "stop" else None
        rows = [RowProgress(len(p), max_new_tokens, eos_id, stops, cap, made) for p, made in zip(batch, result.tokens)]
        active = np.arange(len(batch)) if max_new_tokens > 0 else np.arange(0)  # rows still generating, in state order
        start = time.perf_counter()
        while len(active):
            tokens = choose(logits, sampling, [rngs[i] for i in active])
            keep = []
            for slot, (row, token) in enumerate(zip(active, tokens)):
                yield from ((int(row), t) for t in rows[row].add(int(token)))
                if rows[row].reason:
                    result.stop_reasons[row] = rows[row].reason
                else:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):  # a row finished: drop it from the batch (copies the state once)
                to_come = max(max_new_tokens - rows[r].sampled for r in active[keep])  # this step's token included
                if bounded:  # never past max_seq_len
                    to_come = min(to_come, limit - int(state.tokens[keep].max()))
                active, tokens, state = active[keep], tokens[keep], state.rows(np.array(keep), spare=headroom(state.length, to_come))
            if bounded and int(state.tokens.max()) >= limit:  # on_limit == "slide": re-read each row's last window
                logits, state = self.decoder.prefill([(batch[r] + result.tokens[r])[-limit:] for r in active],
                                                     room=headroom(limit, max(max_new_tokens - rows[r].sampled - 1 for r in active)))
            else:
                logits, state = self.decoder.step(tokens, state)
            result.steps += 1
            result.state_bytes = max(result.state_bytes, state.nbytes)
        if max_new_tokens == 0:
            result.stop_reasons[:] = ["max_new_tokens"] * len(batch)
        result.decode_seconds = time.perf_counter() - start


class RowProgress:
    """One sequence being generated: its tokens so far and the rules that end it.

    A tail that may still grow into a stop sequence is held back until it cannot; `add` returns
    the tokens that are safe to show, and sets `reason` when the row ends: "eos" or
    "stop_sequence" (neither is kept), "max_seq_len" (the newest token can no longer be fed; only
    when `limit` is given) or "max_new_tokens".
    """

    def __init__(self, prompt_length: int, max_new_tokens: int, eos_id: int | None = None,
                 stops: Sequence[Sequence[int]] = (), limit: int | None = None, made: list[int] | None = None):
        self.prompt_length, self.max_new_tokens, self.eos_id, self.limit = prompt_length, max_new_tokens, eos_id, limit
        self.stops = [list(s) for s in stops if len(s)]
        self.made = made if made is not None else []
        self.sampled, self.shown, self.reason = 0, 0, ""

    def add(self, token: int) -> list[int]:
        """Take the next sampled token; the tokens that became safe to show."""
        self.sampled += 1
        self.reason = _append(self.made, token, self.eos_id, self.stops)
        if not self.reason and self.limit is not None and self.prompt_length + len(self.made) > self.limit:
            self.reason = "max_seq_len"
        if not self.reason and self.sampled >= self.max_new_tokens:
            self.reason = "max_new_tokens"
        ready = len(self.made) if self.reason else len(self.made) - _stop_prefix(self.made, self.stops)
        shown, self.shown = self.shown, ready
        return self.made[shown:ready]


def _append(made: list[int], token: int, eos_id: int | None, stops: list[list[int]]) -> str:
    """Append `token` to `made` unless it ends the row; '' or why the row stops (a matched stop sequence is removed)."""
    if eos_id is not None and token == eos_id:
        return "eos"
    made.append(token)
    for stop in stops:
        if made[-len(stop):] == stop:
            del made[-len(stop):]
            return "stop_sequence"
    return ""


def _stop_prefix(made: list[int], stops: list[list[int]]) -> int:
    """Length of the longest tail of `made` that is a proper prefix of a stop sequence."""
    return max((k for stop in stops for k in range(1, len(stop)) if made[-k:] == stop[:k]), default=0)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_single(prompts) -> bool:
    return len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))


def _batch(prompts) -> int:
    return 1 if _is_single(prompts) else len(prompts)
