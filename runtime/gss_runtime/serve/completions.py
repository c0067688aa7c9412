"""OpenAI's completion objects from the engine's events: text, log-probabilities, streamed chunks, best_of.

Log-probabilities follow OpenAI's legacy completions shape, as vLLM fills it: per token its string
(`tokens`), its log-probability (`token_logprobs`), a dict of the most likely tokens plus the chosen
one (`top_logprobs`) and where its text starts in the choice's text (`text_offset`). With `echo`
the prompt comes first, its first token scored None. A value of -inf is written -9999.0.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..logprobs import TokenLogprob
from ..vocabulary import StopText, Vocabulary
from .engine import Failed, Finished, Prompt, Tokens
from .engine import Request as EngineRequest
from .protocol import APIError

DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there
FLOOR = -9999.0  # -inf as vLLM writes it (JSON has no infinities)


def _value(logprob: float) -> float:
    return logprob if logprob > FLOOR else FLOOR


class _Logprobs:
    """One choice's log-probability lists, appended to as its tokens come."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, vocab: Vocabulary, entries: list[TokenLogprob | None], ids: list[int], offsets: list[int]) -> None:
        piece = vocab.piece
        self.tokens += [piece(t) for t in ids]
        self.text_offset += offsets
        for entry in entries:
            if entry is None:  # the prompt's first token: nothing before it to score it
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            top = {piece(t): (v if v > FLOOR else FLOOR) for t, v in entry.top}
            top.setdefault(piece(entry.token), _value(entry.logprob))
            self.token_logprobs.append(_value(entry.logprob))
            self.top_logprobs.append(top)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


class _Choice:
    """One sample being assembled: its text, ids, log-probabilities and end."""

    def __init__(self, vocab: Vocabulary, prompt: list[int], scored: bool, stops: tuple[str, ...] = ()):
        self.vocab, self.prompt, self.scored = vocab, prompt, scored
        self.stream = vocab.stream()
        # stop strings (a tokenizer's): the text ends before the first one reached, as the engine found it;
        # text that may still become one is held back
        self.stops = StopText(stops) if stops else None
        self.stopped = False
        self.text, self.ids, self.reason, self.cumulative = "", [], None, None
        self.logprobs = _Logprobs() if scored else None

    def take(self, event) -> tuple[str, list[int], dict | None]:
        """An event -> (new text, new ids, new log-probability lists or None)."""
        if isinstance(event, Prompt):  # echo: the prompt's text (and scores) first
            ids, entries, shown = list(self.prompt), event.logprobs, []
        elif isinstance(event, Tokens):
            ids, entries, shown = event.ids, event.logprobs, event.ids
        else:  # Finished: what the text decoder still held
            self.reason, self.cumulative = event.reason, event.cumulative_logprob
            ids, entries, shown = [], None, []
        start = len(self.text)
        text, offsets = self.stream.offsets(ids, start)
        if isinstance(event, Finished):
            text = self.stream.end()
        if self.stops is not None and not isinstance(event, Prompt):
            text = self._until_stop(text, isinstance(event, Finished))
        self.text += text
        self.ids += shown
        if not (self.scored and entries):
            return text, shown, None
        part = _Logprobs()
        extra = entries[len(ids):]  # the eos token that ended the choice: scored, not shown
        part.add(self.vocab, entries, ids + [e.token for e in extra], offsets + [len(self.text)] * len(extra))
        for name, values in part.body().items():
            getattr(self.logprobs, name).extend(values)
        return text, shown, part.body()

    def _until_stop(self, text: str, last: bool) -> str:
        if self.stopped:
            return ""
        text, self.stopped = self.stops.add(text)
        return text + (self.stops.end() if last and not self.stopped else "")

    def body(self, index: int) -> dict:
        return {"index": index, "text": self.text, "logprobs": self.logprobs.body() if self.logprobs else None,
                "finish_reason": self.reason, "token_ids": self.ids}


class Reply:
    """Turns engine events into OpenAI's completion objects, for `prompts` x `best_of` samples (sample k is
    prompt k // best_of's sample k % best_of), of which the best `n` per prompt are returned."""

    def __init__(self, model: str, vocab: Vocabulary, prompts: list[list[int]], n: int, best_of: int, logprobs: bool,
                 stops: tuple[str, ...] = ()):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.n, self.best_of = n, best_of
        self.choices = [_Choice(vocab, p, logprobs, stops) for p in prompts for _ in range(best_of)]
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        # a streamed chunk's envelope up to its choices, written once: every running stream sends a chunk per step
        self._head = json.dumps(self.envelope([]), separators=(",", ":"))[: -len("[]}")]

    def take(self, index: int, event) -> tuple[str, list[int], dict | None]:
        if isinstance(event, Finished):
            if index % self.best_of == 0:  # a prompt counts once, however many samples it has
                self.prompt_tokens += event.prompt_tokens
                self.cached_tokens += event.cached_tokens
            self.completion_tokens += event.completion_tokens
        return self.choices[index].take(event)

    def usage(self) -> dict:
        # cached_tokens: prompt tokens served from the prefix cache, where OpenAI and vLLM report them
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def envelope(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def best(self) -> list[dict]:
        """The returned choices: per prompt, its n samples with the highest cumulative log-probability
        (all of them, in order, when best_of is n)."""
        out = []
        for p in range(len(self.choices) // self.best_of):
            samples = self.choices[p * self.best_of : (p + 1) * self.best_of]
            if self.best_of > self.n:
                samples = sorted(samples, key=lambda c: -c.cumulative)[: self.n]
            out += [c.body(p * self.n + rank) for rank, c in enumerate(samples)]
        return out

    def chunk(self, index: int, text: str, ids: list[int], logprobs: dict | None, reason: str | None,
              usage_field: bool) -> str:
        """One streamed chunk as an SSE event: `envelope([choice])` written out from the template, since
        the event loop shares the cores with the model."""
        tail = ',"usage":null}' if usage_field else "}"
        scores = "null" if logprobs is None else json.dumps(logprobs, separators=(",", ":"))
        return (f'data: {self._head}[{{"index":{index},"text":{json.dumps(text)},"logprobs":{scores},"finish_reason":'
                f'{json.dumps(reason)},"token_ids":[{",".join(map(str, ids))}]}}]{tail}\n\n')


async def collect(reply: Reply, queue: asyncio.Queue, requests: list[EngineRequest], http: Request):
    """Wait for every sample to finish; a client that leaves first cancels its requests."""
    left = len(requests)
    watcher = asyncio.create_task(_watch(http, queue))
    try:
        while left:
            index, event = await queue.get()
            if event is None:  # the client has gone: nobody to answer
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise APIError(event.status, event.message, type="server_error" if event.status == 500 else "service_unavailable")
            reply.take(index, event)
            left -= isinstance(event, Finished)
    finally:
        watcher.cancel()
        for r in requests:
            r.cancel()  # a no-op for those that ended
    # a Response, not a dict: FastAPI would walk a dict's every value first (a scored 2,000-token prompt: ~30 ms)
    return JSONResponse(reply.envelope(reply.best(), usage=reply.usage()))


async def _watch(http: Request, queue: asyncio.Queue) -> None:
    """Tell the collector when the client disconnects (a whole answer sends nothing until the end)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    queue.put_nowait((None, None))


async def stream(reply: Reply, queue: asyncio.Queue, requests: list[EngineRequest], include_usage: bool):
    """Server-sent events: one chunk per piece, finish_reason on each choice's last, then [DONE].

    When the client disconnects the response is cancelled here, and its requests leave the batch.
    """
    left = len(requests)
    try:
        while left:
            events = [await queue.get()]
            while not queue.empty():  # what came meanwhile goes out in one write, a choice's tokens in one chunk
                events.append(queue.get_nowait())
            out = []
            for index, event in _coalesced(events):
                if isinstance(event, Failed):
                    yield "".join(out) + _sse(APIError(event.status, event.message, type="server_error").body())
                    return
                text, ids, logprobs = reply.take(index, event)
                reason = event.reason if isinstance(event, Finished) else None
                if text or ids or logprobs or reason:
                    out.append(reply.chunk(index, text, ids, logprobs, reason, include_usage))
                left -= isinstance(event, Finished)
            yield "".join(out)
        if include_usage:
            yield _sse(reply.envelope([], usage=reply.usage()))
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancel()


def _coalesced(events: list) -> list:
    """Consecutive Tokens of the same choice as one."""
    out = []
    for index, event in events:
        if out and isinstance(event, Tokens) and isinstance(out[-1][1], Tokens) and out[-1][0] == index:
            previous = out[-1][1]
            scores = None if previous.logprobs is None else previous.logprobs + event.logprobs
            out[-1] = (index, Tokens(previous.ids + event.ids, scores))
        else:
            out.append((index, event))
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
