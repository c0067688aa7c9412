"""The server as a Ray Serve application: replicas behind Ray's HTTP proxy, each with its own step loop.

Run it with `gss-serve MODEL --ray --replicas N`, or with Ray's own CLI on a running cluster:

    serve run gss_runtime.serve.ray_app:build model=/abs/path/to/export replicas=2 api_key_file=/abs/path/keys

(every node needs gss-runtime[serve] and the export at that path). Ray restarts a replica whose
step loop has died (`check_health`), and the proxy sends requests only to live ones. API keys and request
limits are gss-serve's (guard.py): the keys are read where the application is built (a key file, and
$GSS_API_KEY, on the machine that runs `serve run` or `gss-serve --ray`), and each replica checks them.

Routing (`router=`): "prefix" (the default) puts a small ingress deployment, `GSSIngress`, in front of the
replicas. It checks keys and limits as a replica does, reads the body, and hands the whole HTTP request
to a replica through a DeploymentHandle whose Ray Serve request router is ray_router.PrefixAffinityRouter:
a request goes to the replica that was sent the longest start of its prompt, whose engine can start from
that prompt's cached state. (Ray's proxy hands a router only the request's head, never its body, so the
router has to run behind a deployment that has read it.) "default": the replicas are the ingress, and
Ray's proxy routes by load alone (power of two choices), as before. Each response says which replica
answered it in the header x-gss-replica.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from .app import RETRY_AFTER_SECONDS, ModelHost, build_app
from .budget import parse_size
from .guard import LIMITS, Guard, GuardOptions, error_body, guard_options
from .ray_router import PrefixAffinityRouter, PrefixPolicy, prefix_key

ROUTERS = ("prefix", "default")
REPLICA_HEADER = b"x-gss-replica"
# the paths whose JSON body has a prompt to route by
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
# what of an ASGI scope travels from the ingress to a replica (the rest is the ingress's own)
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
              "headers", "client", "server")
logger = logging.getLogger("ray.serve")

# ModelHost's options a replica takes, and their command-line spelling for `serve run ... key=value`
OPTIONS = {"name": str, "provider": str, "threads": int, "backend": str, "precision": str, "max_batch": int, "max_queue": int, "eos_id": int,
           "max_prefill_tokens": int, "state_memory": lambda text: text if text in ("auto", None) else
           None if text == "off" else text if isinstance(text, int) else parse_size(str(text)),
           "prefix_cache_memory": lambda text: "off" if text in (None, "off") else text if isinstance(text, int) else
           parse_size(str(text))}


def _flag(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# the guard's: API keys (api_key=KEY, api_key_file=FILE; api_keys=[...] in Python) and request limits
GUARD = {"api_key": str, "api_key_file": str, "public_metrics": _flag,
         **{name: float if name.endswith("timeout") else int for name in LIMITS}}


@dataclass
class ForwardedRequest:
    """An HTTP request as GSSIngress hands it to a replica: its scope, its whole body, and the key the
    request router routes it by (ray_router.prefix_key; None: by load alone)."""

    scope: dict
    body: bytes
    prefix_key: str | None = None


class GSSReplica:
    """One replica: loads the model in its own process and serves the same FastAPI app as gss-serve, to
    Ray's proxy (as the ingress, GSSServer) or to GSSIngress (`forward`; GSSBackend)."""

    def __init__(self, model: str, options: dict, guard: GuardOptions | None = None):
        self.host = ModelHost(model, **options).load()
        self.http_app = build_app(self.host, load=False, guard=guard)
        self.http_app.add_middleware(_ReplicaHeader, name=serve.get_replica_context().replica_id.unique_id.encode())

    def __serve_build_asgi_app__(self):
        return self.http_app

    def check_health(self) -> None:
        self.host.ready()  # raises when the step loop has died: Ray replaces the replica

    def __del__(self):  # Ray shuts the replica down (as the ingress, the app's lifespan has done it already)
        if hasattr(self, "host"):
            self.host.stop()

    async def forward(self, request: ForwardedRequest):
        """Run a request GSSIngress forwards through the app; yield its ASGI messages, a list at a time
        (all that are ready). Closed early (the client has gone): the app sees a disconnect and is cancelled."""
        sent, gone = asyncio.Queue(), asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.put_nowait(message)

        task = asyncio.ensure_future(self.http_app(dict(request.scope), receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))  # after every message it sent
        try:
            while True:
                messages = [await sent.get()]
                while not sent.empty():
                    messages.append(sent.get_nowait())
                over = messages[-1] is None
                if over:
                    messages.pop()
                if messages:
                    yield messages
                if over:
                    break
            if not task.cancelled() and task.exception() is not None:
                logger.error("gss-serve: a forwarded request failed", exc_info=task.exception())
        finally:
            if not task.done():
                gone.set()
                task.cancel()


# the same replicas under one deployment name: behind Ray's proxy (router="default"), or behind GSSIngress
# (Ray Serve takes one ASGI ingress in an application)
GSSServer = serve.deployment(name="GSSServer")(serve.ingress()(GSSReplica))
GSSBackend = serve.deployment(name="GSSServer")(GSSReplica)


class _ReplicaHeader:
    """ASGI middleware: x-gss-replica, the Ray replica's id, on every response."""

    def __init__(self, app, name: bytes):
        self.app, self.name = app, name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.name)]}
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment
@serve.ingress()
class GSSIngress:
    """Ray's proxy sends every request here (router="prefix"): API keys and request limits are checked
    as a replica checks them, the body is read, and the request goes on to a replica through `server`,
    a DeploymentHandle whose request router reads the request's prefix_key. The response streams back
    as the replica sends it; a client that leaves cancels the replica's request.

    It is bound with the replicas' own arguments (model, options, guard), then their handle, so that
    either application's deployment says what its replicas serve."""

    def __init__(self, model: str, options: dict, guard: GuardOptions | None, server):
        self.server = server.options(stream=True)
        self.guard = guard or GuardOptions()

    def __serve_build_asgi_app__(self):
        return Guard(self._forward, self.guard)

    async def _forward(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":  # a websocket: the API has none
            await receive()
            return await send({"type": "websocket.close", "code": 1000})
        body = bytearray()
        while True:  # the Guard has read it whole, within the body limit and deadline
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = ForwardedRequest({k: scope[k] for k in SCOPE_KEYS if k in scope}, bytes(body), _key(scope, body))
        responses = self.server.forward.remote(request)
        started = False
        try:
            async for messages in responses:
                for message in messages:
                    started = started or message["type"] == "http.response.start"
                    await send(message)
        except asyncio.CancelledError:
            responses.cancel()
            raise
        except Exception:
            if started:  # part of the answer is out: the connection ends here
                raise
            logger.exception("gss-serve: the replica did not answer a forwarded request")
            answer = error_body("the replica serving this request failed; retry shortly", "replica_failed",
                                "service_unavailable")
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode())]})
            await send({"type": "http.response.body", "body": answer})


def _key(scope: dict, body: bytes) -> str | None:
    """The prefix key of a completion or chat completion request (ray_router.prefix_key), else None."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root):]  # the path as the app's routes see it
    if scope.get("method") != "POST" or path not in ROUTED_PATHS:
        return None
    try:
        return prefix_key(json.loads(body))
    except (ValueError, RecursionError):  # not JSON: the replica answers 400
        return None


def application(model: str | Path, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                target_ongoing_requests: float | None = None, num_cpus: float = 1, guard: GuardOptions | None = None,
                router: str = "prefix", router_options: dict | None = None, **options) -> serve.Application:
    """The Ray Serve application: `replicas` fixed, or autoscaled between min_replicas and max_replicas
    aiming at `target_ongoing_requests` per replica. Each replica reserves `num_cpus` of the cluster.

    API keys and limits: `guard`, or its options (api_key, api_keys, api_key_file, public_metrics, the limits;
    $GSS_API_KEY is read here too), as gss-serve takes them.

    router: "prefix" (requests that share a prompt prefix go to the same replica, through GSSIngress, which
    reserves no CPU; router_options: PrefixAffinityRouter's min_match, match_ratio, max_imbalance and
    index_chars) or "default" (Ray's proxy routes by load alone)."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    tunable = [p for p in inspect.signature(PrefixAffinityRouter.initialize_state).parameters if p != "self"]
    if router_options and (router != "prefix" or set(router_options) - set(tunable)):
        raise ValueError(f"router_options are the prefix router's: {', '.join(tunable)}")
    access = {k: options.pop(k) for k in list(options) if k in GUARD or k == "api_keys"}
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {', '.join(sorted(unknown))}; a replica takes {', '.join([*OPTIONS, *GUARD])}")
    if guard is not None and access:
        raise ValueError(f"give guard or its options ({', '.join(sorted(access))}), not both")
    guard = guard if guard is not None else guard_options(**access)  # a key file that cannot be read fails here
    # a few more than the engine holds, so that past its capacity the replica itself answers 429
    # instead of Ray's proxy holding requests in a queue of its own
    capacity = options.get("max_batch", 32) + options.get("max_queue", 256) + 8
    settings = {"ray_actor_options": {"num_cpus": num_cpus}, "max_ongoing_requests": capacity}
    if min_replicas is not None or max_replicas is not None or target_ongoing_requests is not None:
        auto = {"min_replicas": min_replicas if min_replicas is not None else 1,
                "max_replicas": max_replicas if max_replicas is not None else max(replicas, 1)}
        if target_ongoing_requests is not None:
            auto["target_ongoing_requests"] = target_ongoing_requests
        settings["autoscaling_config"] = auto
    else:
        settings["num_replicas"] = replicas
    model = str(Path(model).resolve())
    if router == "default":
        return GSSServer.options(**settings).bind(model, options, guard)
    PrefixPolicy(**(router_options or {}))  # a bad value fails here, not in every handle's router
    settings["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                            request_router_kwargs=dict(router_options or {}))
    most = max(replicas, max_replicas or 0, 1)
    # one ingress: the router's prefix index is its own, so a second would learn apart from the first
    ingress = GSSIngress.options(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=capacity * most)
    return ingress.bind(model, options, guard, GSSBackend.options(**settings).bind(model, options, guard))


def build(args: dict) -> serve.Application:
    """For `serve run gss_runtime.serve.ray_app:build model=DIR [replicas=N] [router=prefix|default] [max_batch=32]
    [api_key_file=FILE] ...`."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("give model=DIR, the folder written by gss-export")
    counts = {"replicas": int, "min_replicas": int, "max_replicas": int, "target_ongoing_requests": float, "num_cpus": float}
    typed = {k: {**OPTIONS, **counts, **GUARD}.get(k, str)(v) for k, v in args.items() if k != "model"}
    return application(args["model"], **typed)
