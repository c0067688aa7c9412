"""gss-serve as a Ray Serve application: two replicas behind Ray's HTTP proxy on a local cluster,
one of them killed; every request sent after the recovery completes with the right tokens. Requests that
share a prompt prefix reach the replica that has it cached (the prefix router), where Ray's default router
scatters them.

One small cluster (2 CPUs, no dashboard, an 80 MiB object store) is shared by the tests here.
"""
from __future__ import annotations

import importlib.util
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import LONG_PROMPT
from serve_support import free_port, metrics, wait_for

APP = "gss"


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")  # the whole cluster on loopback
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_actors() -> set[tuple[str, str]]:
    import ray

    return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and "#GSSServer#" in a["name"]}  # not the ingress's


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "GSSServer" not in app.deployments:
        return 0
    return app.deployments["GSSServer"].replica_states.get("RUNNING", 0)


def ask_all(url: str, cases: list[dict]) -> list[tuple[int, list[int] | str]]:
    def ask(case):
        reply = httpx.post(f"{url}/v1/completions", json=case, timeout=120)
        return reply.status_code, reply.json()["choices"][0]["token_ids"] if reply.status_code == 200 else reply.text

    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(ask, cases))


def test_two_replicas_survive_losing_one(cluster, example_onnx):
    import ray
    from ray import serve

    from gss_runtime import Generator
    from gss_runtime.serve.ray_app import build

    # what `serve run gss_runtime.serve.ray_app:build model=... replicas=2 threads=1` builds
    serve.run(build({"model": str(example_onnx), "replicas": "2", "threads": "1", "max_batch": "8"}), name=APP, route_prefix="/")
    assert wait_for(lambda: running_replicas() == 2, within=120)
    cases = [{"prompt": list(LONG_PROMPT[: 5 + 30 * i]), "max_tokens": 6 + i, "temperature": 0} for i in range(8)]
    generator = Generator(example_onnx, provider="cpu", threads=1)
    want = [generator.generate(c["prompt"], c["max_tokens"]).tokens[0] for c in cases]
    assert ask_all(cluster, cases) == [(200, w) for w in want]
    assert httpx.get(f"{cluster}/health").status_code == 200
    assert metrics(cluster)["gss_num_requests_running"] == 0  # one replica's metrics: each has its own

    before = replica_actors()
    assert len(before) == 2
    name, namespace = sorted(before)[0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    # the controller notices the dead replica and starts another in its place
    assert wait_for(lambda: running_replicas() == 2 and len(replica_actors() - before) == 1, within=180, every=0.5)
    time.sleep(1)  # the proxy's view of the replicas follows the controller's
    assert ask_all(cluster, cases) == [(200, w) for w in want]
    serve.delete(APP)


def replicas_of(app):
    """The replicas' deployment of an application: behind GSSIngress (router="prefix"), or its ingress."""
    deployment = app._bound_deployment
    return deployment.init_args[3]._bound_deployment if deployment.name == "GSSIngress" else deployment


def test_the_application_takes_replicas_autoscaling_and_replica_options(example_onnx):
    """What `gss-serve --ray` and `serve run ...:build key=value` configure (no cluster needed)."""
    from gss_runtime.serve.ray_app import application, build
    from gss_runtime.serve.ray_router import PrefixAffinityRouter

    fixed = build({"model": str(example_onnx), "replicas": "3", "num_cpus": "0.5", "max_batch": "4", "threads": "2"})
    deployment = replicas_of(fixed)
    assert deployment.name == "GSSServer"
    assert deployment.num_replicas == 3 and deployment.ray_actor_options == {"num_cpus": 0.5}
    assert deployment.init_args[1] == {"max_batch": 4, "threads": 2}
    assert deployment.max_ongoing_requests > 4 + 256  # past the engine's own limit, so it answers 429 itself
    auto = replicas_of(application(example_onnx, min_replicas=1, max_replicas=4, target_ongoing_requests=8))
    scaling = auto._deployment_config.autoscaling_config  # Ray keeps it there; no public accessor
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    for bad in ({"replicas": "2"}, {"model": "m", "bogus": "1"}, {"model": "m", "router": "nearest"}):
        with pytest.raises(ValueError):
            build(bad)

    # the router: prefix affinity by default, behind one ingress that reserves no CPU; Ray's own on request
    ingress = fixed._bound_deployment
    assert ingress.name == "GSSIngress" and ingress.num_replicas == 1 and ingress.ray_actor_options == {"num_cpus": 0}
    assert ingress.max_ongoing_requests >= 3 * deployment.max_ongoing_requests
    config = deployment._deployment_config.request_router_config
    assert config.get_request_router_class().__name__ == PrefixAffinityRouter.__name__
    tuned = replicas_of(application(example_onnx, router_options={"index_chars": 4096, "max_imbalance": 4}))
    assert tuned._deployment_config.request_router_config.request_router_kwargs == {"index_chars": 4096, "max_imbalance": 4}
    plain = build({"model": str(example_onnx), "replicas": "2", "router": "default"})._bound_deployment
    assert plain.name == "GSSServer" and plain.num_replicas == 2
    assert plain._deployment_config.request_router_config.is_default_request_router()
    for bad in ({"router_options": {"bogus": 1}}, {"router_options": {"index_chars": -1}},
                {"router": "default", "router_options": {"min_match": 8}}):
        with pytest.raises(ValueError):
            application(example_onnx, **bad)


def test_api_keys_and_limits_hold_behind_the_proxy(cluster, example_onnx):
    """What `serve run ...:build model=... api_key=KEY max_body_bytes=N` serves: each replica checks the key
    (only /health open) and the limits of the requests Ray's proxy passes on."""
    from ray import serve

    from gss_runtime.serve.ray_app import build

    serve.run(build({"model": str(example_onnx), "replicas": "1", "threads": "1", "api_key": "rk-1", "max_body_bytes": "1000"}),
              name=APP, route_prefix="/")
    assert wait_for(lambda: httpx.get(f"{cluster}/health").status_code == 200, within=120)
    key = {"Authorization": "Bearer rk-1"}
    assert httpx.get(f"{cluster}/v1/models").status_code == 401 and httpx.get(f"{cluster}/metrics").status_code == 401
    assert httpx.get(f"{cluster}/v1/models", headers={"Authorization": "Bearer rk-2"}).status_code == 401
    assert httpx.post(f"{cluster}/v1/completions", json={"prompt": "ab", "max_tokens": 2}, headers=key).status_code == 200
    too_large = httpx.post(f"{cluster}/v1/completions", json={"prompt": "a" * 2000}, headers=key)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    serve.delete(APP)


def test_requests_that_share_a_prefix_reach_the_replica_that_cached_it(cluster, example_onnx):
    """Six prompt prefixes, each then extended four times (test_serve_ray_router's workload), on two replicas:
    under the prefix router every extension reaches the replica that ran its prefix, whose engine has it
    cached, and the prefixes spread over both replicas; under Ray's default router about half miss."""
    from ray import serve

    from gss_runtime.serve.ray_app import build
    from test_serve_ray_router import EXTRA, FOLLOW_UPS, GROUPS, PREFIX, workload

    def ask(prompt):
        reply = httpx.post(f"{cluster}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0},
                           timeout=120)
        assert reply.status_code == 200, reply.text[:300]
        usage = reply.json()["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return reply.headers["x-gss-replica"], usage["prompt_tokens"], cached

    rates, placements = {}, {}
    for router in ("prefix", "default"):
        serve.run(build({"model": str(example_onnx), "replicas": "2", "threads": "1", "max_batch": "8", "router": router}),
                  name=APP, route_prefix="/")
        assert wait_for(lambda: running_replicas() == 2 and httpx.get(f"{cluster}/health").status_code == 200, within=120)
        answers = []
        with ThreadPoolExecutor(GROUPS) as pool:
            for number, prompts in enumerate(workload()):
                # the new prefixes one at a time (Ray's default would place them at random), then rounds together,
                # each in an order of its own (Ray's default alternates the replicas in the order requests come)
                if number == 0:
                    answers.append([ask(p) for p in prompts])
                    continue
                order = random.Random(number).sample(range(GROUPS), GROUPS)
                replies = dict(zip(order, pool.map(ask, [prompts[g] for g in order])))
                answers.append([replies[g] for g in range(GROUPS)])
        serve.delete(APP)
        placements[router] = [[replica for replica, _, _ in round_] for round_ in answers]
        flat = [a for round_ in answers for a in round_]
        assert sum(tokens for _, tokens, _ in flat) == GROUPS * PREFIX + GROUPS * FOLLOW_UPS * (PREFIX + EXTRA)
        if all(cached is not None for _, _, cached in flat):
            rates[router] = sum(cached for _, _, cached in flat) / sum(tokens for _, tokens, _ in flat)

    placed = placements["prefix"]
    assert all(later == placed[0] for later in placed[1:]), placed  # each group where its prefix went
    assert min(placed[0].count(r) for r in set(placed[0])) >= 2 and len(set(placed[0])) == 2, placed[0]  # spread
    assert len({r for round_ in placements["default"] for r in round_}) == 2
    if importlib.util.find_spec("gss_runtime.serve.prefix_cache") is None:  # the engine has no cache to measure
        pytest.skip("no prefix cache in this gss-runtime: the hit rates cannot be measured")
    assert len(rates) == 2, "a response lacks usage.prompt_tokens_details.cached_tokens"
    ideal = GROUPS * FOLLOW_UPS * PREFIX / (GROUPS * PREFIX + GROUPS * FOLLOW_UPS * (PREFIX + EXTRA))
    print(f"\nprompt tokens served from the prefix cache: prefix router {rates['prefix']:.1%}, "
          f"Ray's default router {rates['default']:.1%} (ideal {ideal:.1%})")
    assert rates["prefix"] >= 0.9 * ideal
    # an extension Ray's default sends finds its prefix by chance, one in two: 21 hits of 24 (60.9%, the least
    # that fails this) or more come about once in 7000 runs
    assert rates["prefix"] >= rates["default"] + 0.1
