"""`gss-serve`: serve an export over OpenAI's completions API, in one process or as replicas on Ray Serve."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..backends import check_backend
from ..cli import _count, _number, add_backend_options
from ..cli_support import guarded
from ..decoder import DECODER_NAME
from ..errors import RuntimeInputError
from ..session import check_precision, locate
from . import guard as limits
from .http_limits import uvicorn_settings
from .budget import DEFAULT_SHARE, available_memory, format_size, parse_size
from .prefix_cache import DEFAULT_CAPACITY


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gss-serve", description="Serve a gss-export model over OpenAI's completions API "
                                "(POST /v1/completions, GET /v1/models, /health, /metrics), batching concurrent requests.")
    p.add_argument("model", type=Path, help="folder written by gss-export (decoder.onnx, prefill.onnx, config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_count(0), default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=_count(1), default=32, help="requests generating at once, per replica (default 32)")
    p.add_argument("--max-queue", type=_count(0), default=256, help="requests waiting beyond them before 429 (default 256)")
    p.add_argument("--max-prefill-tokens", type=_count(1), default=1024,
                   help="prompt tokens admitted between two steps (default 1024): bounds the stall of running streams")
    p.add_argument("--state-memory", metavar="SIZE", type=_state_memory, default="auto",
                   help="decoder state the running requests may hold, e.g. 4G or 512M; a request waits until what its state "
                        f"can grow to fits, and one that never could gets 400 (default auto: {int(DEFAULT_SHARE * 100)}%% of "
                        "the memory available at start; off: no budget)")
    p.add_argument("--prefix-cache-memory", metavar="SIZE", type=_prefix_cache_memory, default=DEFAULT_CAPACITY,
                   help="decoder states kept at the end of prompts and completions, so that a prompt starting with one "
                        "(a chat's next turn) computes only the rest; the least recently used go past SIZE, a budget apart "
                        f"from --state-memory (default {format_size(DEFAULT_CAPACITY)}; off: no cache)")
    p.add_argument("--no-prefix-cache", action="store_true", help="keep no states: every prompt is computed whole")
    add_backend_options(p, per=" (per replica)")
    p.add_argument("--name", help="the model's id in the API (default: the folder's name)")
    p.add_argument("--eos-id", type=int, help="a token that ends a completion (not returned), unless a request sets ignore_eos")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    access = p.add_argument_group("API keys and request limits (docs/serving.md: Running in production)")
    access.add_argument("--api-key", metavar="KEY", action="append", default=[],
                        help="clients must send 'Authorization: Bearer KEY' on every route but /health (repeatable; "
                             f"other local users can read a command line: prefer --api-key-file or ${limits.API_KEY_ENV})")
    access.add_argument("--api-key-file", metavar="FILE", type=Path,
                        help=f"API keys, one a line (blank lines and # comments left out); with --api-key and ${limits.API_KEY_ENV}, any of them is accepted")
    access.add_argument("--public-metrics", action="store_true", help="answer /metrics without a key (for a scraper)")
    access.add_argument("--max-body-bytes", metavar="N", type=_count(1), default=limits.MAX_BODY_BYTES,
                        help=f"a larger request body is refused with 413 as it arrives (default {limits.MAX_BODY_BYTES}, 4 MiB)")
    access.add_argument("--body-timeout", metavar="S", type=_seconds, default=limits.BODY_TIMEOUT,
                        help=f"seconds for a request body to arrive whole, else 408 (default {limits.BODY_TIMEOUT:g})")
    access.add_argument("--header-timeout", metavar="S", type=_seconds, default=limits.HEADER_TIMEOUT,
                        help=f"seconds for a request's line and headers to arrive, else 408 (default {limits.HEADER_TIMEOUT:g})")
    access.add_argument("--max-header-bytes", metavar="N", type=_count(1), default=limits.MAX_HEADER_BYTES,
                        help=f"the URL and header fields together, else 431 (default {limits.MAX_HEADER_BYTES})")
    access.add_argument("--max-headers", metavar="N", type=_count(1), default=limits.MAX_HEADERS,
                        help=f"header fields in a request, else 431 (default {limits.MAX_HEADERS})")
    access.add_argument("--max-prompts", metavar="N", type=_count(1), default=limits.MAX_PROMPTS,
                        help=f"prompts in one request, else 400 (default {limits.MAX_PROMPTS})")
    access.add_argument("--max-json-depth", metavar="N", type=_count(1), default=limits.MAX_JSON_DEPTH,
                        help=f"arrays and objects nested in a request body, else 400 (default {limits.MAX_JSON_DEPTH})")
    ray = p.add_argument_group("Ray Serve (pip install 'gss-runtime[serve]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve application behind Ray's HTTP proxy")
    ray.add_argument("--ray-address", help="a running cluster (default: $RAY_ADDRESS, else a local one)")
    ray.add_argument("--replicas", type=_count(1), default=1, help="replicas, each with its own step loop (default 1)")
    ray.add_argument("--min-replicas", type=_count(0), help="autoscale: at least this many replicas")
    ray.add_argument("--max-replicas", type=_count(1), help="autoscale: at most this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, help="autoscale: requests per replica to aim for")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    ray.add_argument("--router", choices=("prefix", "default"), default="prefix",
                     help="prefix (default): a request goes to the replica that was sent the longest start of its prompt; "
                          "default: Ray's own, by load alone")
    return p


def budget_line(budget: int | None, asked) -> str:
    """What the decoder state budget is and where it comes from, said once at start."""
    if asked != "auto":
        return f"decoder state budget {format_size(budget) if budget else 'off'} (--state-memory)"
    free = available_memory()
    if not budget:
        return "decoder state budget off (the available memory could not be read; set --state-memory)"
    return f"decoder state budget {format_size(budget)} ({int(DEFAULT_SHARE * 100)}% of the {format_size(free)} available at start)"


def _prefix_cache_memory(text: str) -> int | str:
    return "off" if text == "off" else _state_memory(text)


def _state_memory(text: str) -> int | str | None:
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def guard_of(args: argparse.Namespace, environ=None) -> limits.GuardOptions:
    """The API keys (--api-key, --api-key-file, $GSS_API_KEY) and request limits the options give."""
    return limits.guard_options(api_keys=args.api_key, api_key_file=args.api_key_file,
                                environ=os.environ if environ is None else environ, public_metrics=args.public_metrics,
                                **{name: getattr(args, name) for name in limits.LIMITS})


def run(args: argparse.Namespace) -> None:
    _, config_file = locate(args.model, DECODER_NAME)  # a wrong path fails here, before anything listens
    check_backend(args.backend, args.provider, args.threads, args.precision)  # and so does a backend it cannot have
    check_precision(args.backend, args.precision, config_file)
    guard = guard_of(args)  # so does a key file that cannot be read
    options = dict(name=args.name, provider=args.provider, threads=args.threads, backend=args.backend, precision=args.precision,
                   max_batch=args.max_batch,
                   max_queue=args.max_queue, eos_id=args.eos_id, max_prefill_tokens=args.max_prefill_tokens,
                   state_memory=args.state_memory,  # "auto" is worked out where the engine runs (each Ray replica)
                   prefix_cache_memory="off" if args.no_prefix_cache else args.prefix_cache_memory)
    if args.ray:
        return _run_on_ray(args, options, guard)
    import uvicorn

    from .app import ModelHost, build_app

    host = ModelHost(args.model, **options)
    print(f"gss-serve: {budget_line(host.state_memory, args.state_memory)}", file=sys.stderr, flush=True)
    cache = host.prefix_cache_memory
    print(f"gss-serve: prefix cache {format_size(cache) if cache else 'off'}", file=sys.stderr, flush=True)
    app = build_app(host, guard=guard)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # end the running requests first, so their connections can close
            host.stop()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=5, **uvicorn_settings(guard)))
    app.state.on_load_failure = lambda message: setattr(server, "should_exit", True)
    server.run()
    if host.error:
        raise RuntimeInputError(f"cannot serve {args.model}: {host.error}")


def _run_on_ray(args: argparse.Namespace, options: dict, guard: limits.GuardOptions) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeInputError("--ray needs Ray Serve: pip install 'gss-runtime[serve]'") from None
    from .ray_app import application

    ray.init(address=args.ray_address, include_dashboard=False, logging_level=args.log_level.upper())
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(args.model, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.replica_cpus, guard=guard,
                      router=args.router,
                      **{k: v for k, v in options.items() if v is not None})
    try:
        serve.run(app, name="gss", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()


def main() -> None:
    args = parser().parse_args()
    guarded(lambda: run(args), (RuntimeInputError,), "GSS_SERVE_DEBUG")


if __name__ == "__main__":
    main()
