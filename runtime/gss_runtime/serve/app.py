"""The HTTP side of gss-serve: OpenAI's completions API on FastAPI, over one continuous-batching Engine.

Handlers never run onnxruntime: they check the request, hand it to the engine's step loop and
wait on an asyncio queue the loop's thread feeds, so health checks and streams stay responsive
while the model computes.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..decoder import Decoder
from ..errors import RuntimeInputError
from ..session import SPIN_IN_CALL
from ..tokenizer import vocabulary_for
from .budget import default_budget, parse_size, return_freed_memory_to_the_os
from .completions import Reply, collect, stream
from .engine import Engine, EngineStopped, Overloaded, TooLarge
from .engine import Request as EngineRequest
from .guard import Guard, GuardOptions, current_options
from .metrics import ServerMetrics
from .prefix_cache import DEFAULT_CAPACITY
from . import chat, tokenization
from .chat import ChatCompletionRequest
from .strict_json import check_prompt_count, parse_json
from .protocol import APIError, CompletionRequest, DetokenizeRequest, TokenizeRequest, completions_of, samples_of, validation_error

RETRY_AFTER_SECONDS = 1


class ModelHost:
    """One exported model behind the server: its engine once loaded, or why it could not be.

    model: a gss-export folder (decoder.onnx, prefill.onnx, config.json); name: what clients call it
    (the folder's name by default); eos_id: a token that ends a completion unless `ignore_eos`;
    provider, threads, backend, precision: where the graphs run, as Decoder's.
    """

    def __init__(self, model: str | Path, name: str | None = None, provider: str = "auto", threads: int | None = None,
                 backend: str = "onnxruntime", precision: str = "f32",
                 max_batch: int = 32, max_queue: int = 256, eos_id: int | None = None, max_prefill_tokens: int = 1024,
                 state_memory: int | str | None = "auto", prefix_cache_memory: int | str | None = DEFAULT_CAPACITY):
        self.model, self.name = Path(model), name or Path(model).resolve().name
        self.provider, self.threads, self.max_batch, self.max_queue, self.eos_id = provider, threads, max_batch, max_queue, eos_id
        self.backend, self.precision = backend, precision
        self.max_prefill_tokens = max_prefill_tokens
        # bytes of decoder state for running requests; "auto": budget.DEFAULT_SHARE of the memory available now
        self.state_memory = default_budget() if state_memory == "auto" else state_memory
        # bytes of the prefix cache's snapshots, a budget of their own: a size ("1G"), or None / "off" for no cache
        self.prefix_cache_memory = (None if prefix_cache_memory in (None, "off") else parse_size(prefix_cache_memory)
                                    if isinstance(prefix_cache_memory, str) else prefix_cache_memory)
        self.engine: Engine | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(running=lambda: self.engine.running if self.engine else 0,
                                     waiting=lambda: self.engine.waiting if self.engine else 0,
                                     state=lambda: self.engine.state_bytes if self.engine else (0, 0),
                                     budget=lambda: self.state_memory or 0,
                                     prefix_cache=lambda: self.engine.prefix_cache_usage if self.engine else
                                     (0, 0, self.prefix_cache_memory or 0))

    def load(self) -> "ModelHost":
        """Open the decoder and start the step loop (raises RuntimeInputError for an unusable model)."""
        if self.state_memory is not None:
            return_freed_memory_to_the_os()  # else freed states linger in the C heap, past the budget
        # threads that spin between steps take the cores the event loop and the clients need (one stream's
        # time per token: 5.3 ms; never spinning, 2.2 ms, but each operator then waits for its threads to wake:
        # a batch of 16 stepped in 4.4 ms against 3.4); spinning within each call only has the best of both
        decoder = Decoder(self.model, provider=self.provider, threads=self.threads, spin=SPIN_IN_CALL, backend=self.backend,
                          precision=self.precision)
        if self.eos_id is not None and not 0 <= self.eos_id < decoder.config["num_tokens"]:
            raise RuntimeInputError(f"--eos-id {self.eos_id} is out of range [0, {decoder.config['num_tokens']})")
        # text through the export's tokenizer when it has one (else bytes, or ids only); its end-of-text token
        # ends completions unless --eos-id names another
        self.vocabulary = vocabulary_for(self.model if self.model.is_dir() else self.model.parent, decoder.config["num_tokens"])
        files = getattr(self.vocabulary, "files", None)
        if self.eos_id is None and files is not None:
            self.eos_id = files.eos_token_id
        self.engine = Engine(decoder, self.max_batch, self.max_queue, self.metrics, self.max_prefill_tokens,
                             self.state_memory, self.prefix_cache_memory).start()
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


def build_app(host: ModelHost, load: bool = True, guard: GuardOptions | None = None) -> FastAPI:
    """The FastAPI application over `host`; load=True loads the model when the server starts
    (health answers 503 until it has), else the host must already be loaded. `guard`: API keys and
    request limits, checked by middleware before any route (the defaults and no keys if None)."""

    async def lifespan(app: FastAPI):
        if load:
            host.load_in_background(getattr(app.state, "on_load_failure", lambda message: None))
        yield
        host.stop()

    app = FastAPI(title="gss-serve", lifespan=lifespan)
    # around every route, those added later too: keys on all but /health (and /metrics if public), body limits
    app.add_middleware(Guard, options=guard or GuardOptions(), on_reject=lambda status: host.metrics.rejected.labels(str(status)).inc())
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
    async def metrics():  # behind the API key unless the guard's public_metrics
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
        body = _parse(await request.body(), CompletionRequest)
        _check_model(body.model)
        asks = completions_of(body, engine.decoder.config, host.eos_id, host.vocabulary)
        n, best_of = samples_of(body)
        prompts = [list(a.prompt) for a in asks[::best_of]]
        reply = Reply(host.name, host.vocabulary, prompts, n, best_of, body.logprobs is not None, asks[0].stop_texts)
        return await _answer(engine, asks, best_of, reply, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine = host.ready()
        body = _parse(await request.body(), ChatCompletionRequest)
        _check_model(body.model)
        # the template writes the special tokens itself: none are added
        prompt = host.vocabulary.encode(chat.render(host.vocabulary, body), special=False)
        plain = chat.as_completion(body, prompt, engine.decoder.config, engine.decoder.bounded)
        asks = completions_of(plain, engine.decoder.config, host.eos_id, host.vocabulary)
        n, _ = samples_of(plain)
        reply = chat.chat_reply(host.name, host.vocabulary, [list(asks[0].prompt)], n, body, asks[0].stop_texts)
        return await _answer(engine, asks, n, reply, plain, request)

    async def _answer(engine: Engine, asks: list, best_of: int, reply: Reply, body: CompletionRequest, request: Request):
        """Submit the samples (a prompt's best_of share one prefill) and answer: whole, or streamed."""
        if len(asks) > engine.max_batch + engine.max_queue:  # could never be admitted together: not a 429
            raise APIError(400, f"{len(asks)} samples in one request; this server holds at most "
                                f"{engine.max_batch + engine.max_queue} requests at once", param="prompt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        channel = channels.setdefault(loop, _LoopChannel(loop))
        # a prompt's best_of samples form one group: one prefill, its state copied into their rows
        groups = [object() for _ in range(len(asks) // best_of)]
        requests = [EngineRequest(c, channel, (queue, k), group=groups[k // best_of]) for k, c in enumerate(asks)]
        try:
            engine.submit(requests)
        except TooLarge as e:
            raise APIError(400, str(e), param="max_tokens") from None
        except Overloaded as e:
            raise APIError(429, f"{e}; retry shortly", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="service_unavailable") from None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, queue, requests, usage), media_type="text/event-stream")
        return await collect(reply, queue, requests, request)

    def _check_model(model: str | None) -> None:
        if model is not None and model != host.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {host.name!r}",
                           param="model", code="model_not_found")

    # vLLM's tokenizer endpoints, at the root as vLLM serves them
    @app.post("/tokenize")
    async def tokenize(request: Request):
        engine = host.ready()
        body = _parse(await request.body(), TokenizeRequest)
        _check_model(body.model)
        return tokenization.tokenize(body, engine.decoder.config, host.vocabulary)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        engine = host.ready()
        body = _parse(await request.body(), DetokenizeRequest)
        _check_model(body.model)
        return tokenization.detokenize(body, engine.decoder.config, host.vocabulary)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        engine = host.ready()
        return tokenization.info(engine.decoder.config, host.vocabulary, host.eos_id)

    return app


def _parse(raw: bytes, model: type[BaseModel]):
    """The body as JSON whatever its content type says (curl -d sends a form type), then checked as `model`.

    Strict JSON (strict_json.parse_json): any failure is a 400, never a RecursionError or a later UnicodeEncodeError;
    at most the server's --max-prompts prompts."""
    options = current_options()  # the options of the Guard the request came through
    data = parse_json(raw, options.max_json_depth)
    check_prompt_count(data, options.max_prompts)
    try:
        return model.model_validate(data)
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
