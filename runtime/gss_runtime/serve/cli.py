"""`gss-serve`: serve an export over OpenAI's completions API, in one process or as replicas on Ray Serve."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import PROVIDERS, _count
from ..cli_support import guarded
from ..decoder import DECODER_NAME
from ..errors import RuntimeInputError
from ..session import locate


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
    p.add_argument("--provider", choices=PROVIDERS, default="auto", help="auto (default): CUDA when it really works, else CPU")
    p.add_argument("--threads", type=_count(1), help="onnxruntime intra-op threads (per replica)")
    p.add_argument("--name", help="the model's id in the API (default: the folder's name)")
    p.add_argument("--eos-id", type=int, help="a token that ends a completion (not returned), unless a request sets ignore_eos")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = p.add_argument_group("Ray Serve (pip install 'gss-runtime[serve]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve application behind Ray's HTTP proxy")
    ray.add_argument("--ray-address", help="a running cluster (default: $RAY_ADDRESS, else a local one)")
    ray.add_argument("--replicas", type=_count(1), default=1, help="replicas, each with its own step loop (default 1)")
    ray.add_argument("--min-replicas", type=_count(0), help="autoscale: at least this many replicas")
    ray.add_argument("--max-replicas", type=_count(1), help="autoscale: at most this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, help="autoscale: requests per replica to aim for")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    return p


def run(args: argparse.Namespace) -> None:
    locate(args.model, DECODER_NAME)  # a wrong path fails here, before anything listens
    options = dict(name=args.name, provider=args.provider, threads=args.threads, max_batch=args.max_batch,
                   max_queue=args.max_queue, eos_id=args.eos_id, max_prefill_tokens=args.max_prefill_tokens)
    if args.ray:
        return _run_on_ray(args, options)
    import uvicorn

    from .app import ModelHost, build_app

    host = ModelHost(args.model, **options)
    app = build_app(host)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # end the running requests first, so their connections can close
            host.stop()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=5))
    app.state.on_load_failure = lambda message: setattr(server, "should_exit", True)
    server.run()
    if host.error:
        raise RuntimeInputError(f"cannot serve {args.model}: {host.error}")


def _run_on_ray(args: argparse.Namespace, options: dict) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeInputError("--ray needs Ray Serve: pip install 'gss-runtime[serve]'") from None
    from .ray_app import application

    ray.init(address=args.ray_address, include_dashboard=False, logging_level=args.log_level.upper())
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(args.model, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.replica_cpus,
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
