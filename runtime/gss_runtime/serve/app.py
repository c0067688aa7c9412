"""The HTTP side of gss-serve: OpenAI's completions API on FastAPI, over one continuous-batching Engine.

Handlers never run onnxruntime: they check the request, hand it to the engine's step loop and
wait on an asyncio queue the loop's thread feeds, so health checks and streams stay responsive
while the model computes.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..decoder import Decoder
from ..errors import RuntimeInputError
from ..session import SPIN_IN_CALL
from .engine import Engine, EngineStopped, Failed, Finished, Overloaded, Tokens
from .engine import Request as EngineRequest
from .metrics import ServerMetrics
from .protocol import BYTE_VOCAB, APIError, CompletionRequest, completions_of, validation_error

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there


class ModelHost:
    """One exported model behind the server: its engine once loaded, or why it could not be.

    model: a gss-export folder (decoder.onnx, prefill.onnx, config.json); name: what clients call it
    (the folder's name by default); eos_id: a token that ends a completion unless `ignore_eos`.
    """

    def __init__(self, model: str | Path, name: str | None = None, provider: str = "auto", threads: int | None = None,
                 max_batch: int = 32, max_queue: int = 256, eos_id: int | None = None, max_prefill_tokens: int = 1024):
        self.model, self.name = Path(model), name or Path(model).resolve().name
        self.provider, self.threads, self.max_batch, self.max_queue, self.eos_id = provider, threads, max_batch, max_queue, eos_id
        self.max_prefill_tokens = max_prefill_tokens
        self.engine: Engine | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(running=lambda: self.engine.running if self.engine else 0,
                                     waiting=lambda: self.engine.waiting if self.engine else 0)

    def load(self) -> "ModelHost":
        """Open the decoder and start the step loop (raises RuntimeInputError for an unusable model)."""
        # threads that spin between steps take the cores the event loop and the clients need (one stream's
        # time per token: 5.3 ms; never spinning, 2.2 ms, but each operator then waits for its threads to wake:
        # a batch of 16 stepped in 4.4 ms against 3.4); spinning within each call only has the best of both
        decoder = Decoder(self.model, provider=self.provider, threads=self.threads, spin=SPIN_IN_CALL)
        if self.eos_id is not None and not 0 <= self.eos_id < decoder.config["num_tokens"]:
            raise RuntimeInputError(f"--eos-id {self.eos_id} is out of range [0, {decoder.config['num_tokens']})")
        self.engine = Engine(decoder, self.max_batch, self.max_queue, self.metrics, self.max_prefill_tokens).start()
        return self

    def load_in_background(self, on_failure: Callable[[str], None] = lambda message: None) -> None:
        def run():
            try:
                self.load()
            except Exception as e:  # shown by /health and handed to the caller (gss-serve exits with it)
                self.error = str(e) if isinstance(e, (ValueError, APIError)) else f"{type(e).__name__}: {e}"
                on_failure(self.error)
        threading.Thread(target=run, name="gss-load", daemon=True).start()

    def ready(self) -> Engine:
        if self.engine is None:
            raise APIError(503, self.error or "the model is still loading", type="service_unavailable")
        if not self.engine.alive:
            raise APIError(503, self.engine.error or "the step loop has stopped", type="service_unavailable")
        return self.engine

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def build_app(host: ModelHost, load: bool = True) -> FastAPI:
    """The FastAPI application over `host`; load=True loads the model when the server starts
    (health answers 503 until it has), else the host must already be loaded."""

    async def lifespan(app: FastAPI):
        if load:
            host.load_in_background(getattr(app.state, "on_load_failure", lambda message: None))
        yield
        host.stop()

    app = FastAPI(title="gss-serve", lifespan=lifespan)
    channels: dict[asyncio.AbstractEventLoop, _LoopChannel] = {}

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        host.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind))

    @app.get("/health")
    async def health():
        try:
            host.ready()
        except APIError as e:
            return JSONResponse({"status": "unavailable", "message": e.message}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(host.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        engine = host.ready()
        config = engine.decoder.config
        return {"object": "list", "data": [{
            "id": host.name, "object": "model", "created": host.created, "owned_by": "gss-export",
            "max_model_len": config["max_seq_len"], "family": config["family"], "num_tokens": config["num_tokens"],
            "context": "bounded" if engine.decoder.bounded else "unbounded",
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = host.ready()
        body = _parse(await request.body())
        if body.model is not None and body.model != host.name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {host.name!r}",
                           param="model", code="model_not_found")
        config = engine.decoder.config
        asks = completions_of(body, config, host.eos_id)
        if len(asks) > engine.max_batch + engine.max_queue:  # could never be admitted together: not a 429
            raise APIError(400, f"{len(asks)} prompts in one request; this server holds at most "
                                f"{engine.max_batch + engine.max_queue} requests at once", param="prompt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        channel = channels.setdefault(loop, _LoopChannel(loop))
        requests = [EngineRequest(c, channel, (queue, i)) for i, c in enumerate(asks)]
        try:
            engine.submit(requests)
        except Overloaded as e:
            raise APIError(429, f"{e}; retry shortly", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="service_unavailable") from None
        reply = _Reply(host.name, config["num_tokens"] == BYTE_VOCAB, len(requests))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(reply, queue, requests, usage), media_type="text/event-stream")
        return await _collect(reply, queue, requests, request)

    return app


def _parse(raw: bytes) -> CompletionRequest:
    """The body as JSON whatever its content type says (curl -d sends a form type), then checked."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(list(e.errors())) from None


class _LoopChannel:
    """Hands a step's events to one event loop in one wake-up; each goes to its request's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def __call__(self, items: list) -> None:  # on the step loop's thread
        self.loop.call_soon_threadsafe(self._put, items)

    @staticmethod
    def _put(items: list) -> None:  # on the event loop
        for request, event in items:
            queue, index = request.tag
            queue.put_nowait((index, event))


class _Reply:
    """Turns engine events into OpenAI's completion objects: text per choice, and the usage."""

    def __init__(self, model: str, byte_level: bool, choices: int):
        self.id, self.created, self.model, self.byte_level = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, byte_level
        self.utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(choices)]
        self.texts, self.ids = [""] * choices, [[] for _ in range(choices)]
        self.reasons: list[str | None] = [None] * choices
        self.prompt_tokens = self.completion_tokens = 0
        # a streamed chunk's envelope up to its choices, written once: every running stream sends a chunk per step
        self._head = json.dumps(self.envelope([]), separators=(",", ":"))[: -len("[]}")]

    def text(self, index: int, ids: list[int], final: bool = False) -> str:
        """The text of new tokens: bytes as UTF-8 as soon as characters are whole; other ids as ' 1 2'."""
        if self.byte_level:
            piece = self.utf8[index].decode(bytes(ids), final=final)
        else:
            piece = "".join(f" {t}" for t in ids)
        self.texts[index] += piece
        self.ids[index] += ids
        return piece

    def finish(self, index: int, event: Finished) -> str:
        self.reasons[index] = event.reason
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        return self.text(index, [], final=True)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def envelope(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    @staticmethod
    def choice(index: int, text: str, ids: list[int], reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason, "token_ids": ids}

    def chunk(self, index: int, text: str, ids: list[int], reason: str | None, usage_field: bool) -> str:
        """One streamed chunk as an SSE event: `envelope([choice(...)])` written out from the template, since
        the event loop shares the cores with the model."""
        tail = ',"usage":null}' if usage_field else "}"
        return (f'data: {self._head}[{{"index":{index},"text":{json.dumps(text)},"logprobs":null,"finish_reason":'
                f'{json.dumps(reason)},"token_ids":[{",".join(map(str, ids))}]}}]{tail}\n\n')


async def _collect(reply: _Reply, queue: asyncio.Queue, requests: list[EngineRequest], http: Request):
    """Wait for every choice to finish; a client that leaves first cancels its requests."""
    left = len(requests)
    watcher = asyncio.create_task(_watch(http, queue))
    try:
        while left:
            index, event = await queue.get()
            if event is None:  # the client has gone: nobody to answer
                return Response(status_code=499)
            if isinstance(event, Tokens):
                reply.text(index, event.ids)
            elif isinstance(event, Finished):
                reply.finish(index, event)
                left -= 1
            elif isinstance(event, Failed):
                raise APIError(event.status, event.message, type="server_error" if event.status == 500 else "service_unavailable")
    finally:
        watcher.cancel()
        for r in requests:
            r.cancel()  # a no-op for those that ended
    choices = [reply.choice(i, reply.texts[i], reply.ids[i], reply.reasons[i]) for i in range(len(requests))]
    return reply.envelope(choices, usage=reply.usage())


async def _watch(http: Request, queue: asyncio.Queue) -> None:
    """Tell the collector when the client disconnects (a whole answer sends nothing until the end)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    queue.put_nowait((None, None))


async def _stream(reply: _Reply, queue: asyncio.Queue, requests: list[EngineRequest], include_usage: bool):
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
                if isinstance(event, Tokens):
                    out.append(reply.chunk(index, reply.text(index, event.ids), event.ids, None, include_usage))
                elif isinstance(event, Finished):
                    out.append(reply.chunk(index, reply.finish(index, event), [], event.reason, include_usage))
                    left -= 1
                else:
                    yield "".join(out) + _sse(APIError(event.status, event.message, type="server_error").body())
                    return
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
            out[-1] = (index, Tokens(out[-1][1].ids + event.ids))
        else:
            out.append((index, event))
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
