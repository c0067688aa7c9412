"""The server as a Ray Serve application: replicas behind Ray's HTTP proxy, each with its own step loop.

Run it with `gss-serve MODEL --ray --replicas N`, or with Ray's own CLI on a running cluster:

    serve run gss_runtime.serve.ray_app:build model=/abs/path/to/export replicas=2 api_key_file=/abs/path/keys

(every node needs gss-runtime[serve] and the export at that path). Ray restarts a replica whose
step loop has died (`check_health`), and the proxy sends requests only to live ones. API keys and request
limits are gss-serve's (guard.py): the keys are read where the application is built (a key file, and
$GSS_API_KEY, on the machine that runs `serve run` or `gss-serve --ray`), and each replica checks them.
"""
from __future__ import annotations

from pathlib import Path

from ray import serve

from .app import ModelHost, build_app
from .budget import parse_size
from .guard import LIMITS, GuardOptions, guard_options

# ModelHost's options a replica takes, and their command-line spelling for `serve run ... key=value`
OPTIONS = {"name": str, "provider": str, "threads": int, "max_batch": int, "max_queue": int, "eos_id": int,
           "max_prefill_tokens": int, "state_memory": lambda text: text if text in ("auto", None) else
           None if text == "off" else text if isinstance(text, int) else parse_size(str(text))}


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


@serve.deployment
@serve.ingress()
class GSSServer:
    """One replica: loads the model in its own process and serves the same FastAPI app as gss-serve."""

    def __init__(self, model: str, options: dict, guard: GuardOptions | None = None):
        self.host = ModelHost(model, **options).load()
        self.guard = guard

    def __serve_build_asgi_app__(self):
        return build_app(self.host, load=False, guard=self.guard)

    def check_health(self) -> None:
        self.host.ready()  # raises when the step loop has died: Ray replaces the replica


def application(model: str | Path, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                target_ongoing_requests: float | None = None, num_cpus: float = 1, guard: GuardOptions | None = None,
                **options) -> serve.Application:
    """The Ray Serve application: `replicas` fixed, or autoscaled between min_replicas and max_replicas
    aiming at `target_ongoing_requests` per replica. Each replica reserves `num_cpus` of the cluster.

    API keys and limits: `guard`, or its options (api_key, api_keys, api_key_file, public_metrics, the limits;
    $GSS_API_KEY is read here too), as gss-serve takes them."""
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
    return GSSServer.options(**settings).bind(str(Path(model).resolve()), options, guard)


def build(args: dict) -> serve.Application:
    """For `serve run gss_runtime.serve.ray_app:build model=DIR [replicas=N] [max_batch=32] [api_key_file=FILE] ...`."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("give model=DIR, the folder written by gss-export")
    counts = {"replicas": int, "min_replicas": int, "max_replicas": int, "target_ongoing_requests": float, "num_cpus": float}
    typed = {k: {**OPTIONS, **counts, **GUARD}.get(k, str)(v) for k, v in args.items() if k != "model"}
    return application(args["model"], **typed)
