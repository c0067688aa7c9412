"""The server as a Ray Serve application: replicas behind Ray's HTTP proxy, each with its own step loop.

Run it with `gss-serve MODEL --ray --replicas N`, or with Ray's own CLI on a running cluster:

    serve run gss_runtime.serve.ray_app:build model=/abs/path/to/export replicas=2

(every node needs gss-runtime[serve] and the export at that path). Ray restarts a replica whose
step loop has died (`check_health`), and the proxy sends requests only to live ones.
"""
from __future__ import annotations

from pathlib import Path

from ray import serve

from .app import ModelHost, build_app

# ModelHost's options a replica takes, and their command-line spelling for `serve run ... key=value`
OPTIONS = {"name": str, "provider": str, "threads": int, "max_batch": int, "max_queue": int, "eos_id": int,
           "max_prefill_tokens": int}


@serve.deployment
@serve.ingress()
class GSSServer:
    """One replica: loads the model in its own process and serves the same FastAPI app as gss-serve."""

    def __init__(self, model: str, options: dict):
        self.host = ModelHost(model, **options).load()

    def __serve_build_asgi_app__(self):
        return build_app(self.host, load=False)

    def check_health(self) -> None:
        self.host.ready()  # raises when the step loop has died: Ray replaces the replica


def application(model: str | Path, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                target_ongoing_requests: float | None = None, num_cpus: float = 1, **options) -> serve.Application:
    """The Ray Serve application: `replicas` fixed, or autoscaled between min_replicas and max_replicas
    aiming at `target_ongoing_requests` per replica. Each replica reserves `num_cpus` of the cluster."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {', '.join(sorted(unknown))}; a replica takes {', '.join(OPTIONS)}")
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
    return GSSServer.options(**settings).bind(str(Path(model).resolve()), options)


def build(args: dict) -> serve.Application:
    """For `serve run gss_runtime.serve.ray_app:build model=DIR [replicas=N] [max_batch=32] ...`."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("give model=DIR, the folder written by gss-export")
    counts = {"replicas": int, "min_replicas": int, "max_replicas": int, "target_ongoing_requests": float, "num_cpus": float}
    typed = {k: {**OPTIONS, **counts}.get(k, str)(v) for k, v in args.items() if k != "model"}
    return application(args["model"], **typed)
