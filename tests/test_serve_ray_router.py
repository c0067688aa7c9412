"""The prefix-affinity request router of gss-serve on Ray Serve (gss_runtime.serve.ray_router), without a cluster.

Ray's own routing loop (RequestRouter: ranks of replicas, queue lengths probed and cached) runs with fake
replicas; a replica "caches" the prompts it was sent, as the engine's prefix cache keeps a prompt's end, so
the share of prompt tokens a replica could take from its cache can be compared between this router and
Ray's default (power of two choices). test_serve_ray.py checks the same on live replicas.
"""
from __future__ import annotations

import asyncio
import random
import uuid
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from gss_runtime.serve.ray_router import (  # noqa: E402
    BLOCK, MAX_KEY_CHARS, PrefixAffinityRouter, PrefixIndex, PrefixPolicy, prefix_key, request_key)

GROUPS, FOLLOW_UPS, PREFIX, EXTRA = 6, 4, 256, 48


# ---- keys ---------------------------------------------------------------------------------------------

def test_a_request_body_has_one_key_that_starts_with_its_earlier_turns():
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = turn + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "é"}]}]
    assert prefix_key({"messages": later}).startswith(prefix_key({"messages": turn}))
    assert prefix_key({"messages": turn}) != prefix_key({"messages": turn[1:]})
    # text, token ids and chats never share a key; a batch goes by its first prompt
    assert prefix_key({"prompt": "abc"}) == "sabc"
    assert prefix_key({"prompt": [97, 98, 99]}) == "iabc" and prefix_key({"prompt": [[97, 98], [1]]}) == "iab"
    assert prefix_key({"prompt": ["ab", "cd"]}) == "sab"
    assert prefix_key({"prompt": [0xD800, 0xE000]}) == "i" + chr(0xD800 + 0x800) + chr(0xE000 + 0x800)  # no surrogates
    assert len(prefix_key({"prompt": "x" * (2 * MAX_KEY_CHARS)})) == MAX_KEY_CHARS
    for body in ({"prompt": [1, -2]}, {"prompt": [1, True]}, {"prompt": [1.5]}, {"prompt": ""}, {"prompt": []},
                 {"prompt": 3}, {"messages": []}, {}, [1, 2], "text", None):
        assert prefix_key(body) is None, body
    # what the router reads: a forwarded request's key, or an argument that is a request body
    assert request_key(SimpleNamespace(args=[SimpleNamespace(prefix_key="sk")], kwargs={})) == "sk"
    assert request_key(SimpleNamespace(args=[], kwargs={"body": {"prompt": "x"}})) == "sx"
    assert request_key(SimpleNamespace(args=[b"http"], kwargs={})) is None and request_key(None) is None


# ---- the index ----------------------------------------------------------------------------------------

def test_the_index_matches_whole_blocks_and_keeps_within_its_bound():
    index = PrefixIndex(max_chars=64 * BLOCK)
    a, b = "s" + "a" * 200, "s" + "b" * 200
    index.insert(a, "r1")
    index.insert(a[:100], "r2")
    assert index.match(a + "tail", ["r1", "r2", "r3"]) == {"r1": 192, "r2": 96, "r3": 0}  # whole blocks only
    assert index.match(b, ["r1", "r2"]) == {"r1": 0, "r2": 0}
    assert index.held("r1") == 192 and index.held("r3") == 0
    for i in range(20):  # 20 more keys of 12 blocks: past the bound of 64 blocks
        index.insert("s" + f"{i:04}" * 50, "r3")
    assert len(index) == 64 and index.held("r1") + index.held("r2") + index.held("r3") == 64 * BLOCK
    assert index.match(a, ["r1"]) == {"r1": 0}  # the least recently sent went first
    last = "s" + "0019" * 50
    assert index.match(last, ["r3"]) == {"r3": 192}
    index.insert("s" + "z" * 100, "r1")  # the older key loses its last blocks first, never its first ones
    assert index.match("s" + "0018" * 50, ["r3"])["r3"] > 0
    index.remove("r3")
    assert index.match(last, ["r3"]) == {"r3": 0} and index.held("r3") == 0 and "r3" not in index.replicas()
    with pytest.raises(ValueError):
        PrefixIndex(max_chars=BLOCK - 1)


def test_the_policy_wants_a_substantial_match_on_a_replica_not_much_busier():
    policy = PrefixPolicy(min_match=64, match_ratio=0.5, max_imbalance=4)
    prompt = "s" + "p" * 300
    policy.index.insert(prompt, "r1")
    policy.index.insert(prompt[:80], "r2")
    assert policy.affine(prompt + "more", ["r1", "r2", "r3"]) == ["r1"]
    assert policy.affine(prompt[:100] + "x" * 900, ["r1", "r2"]) == []  # 96 of 1000 characters: under match_ratio
    assert policy.affine(prompt[:50], ["r1", "r2"]) == []  # under min_match
    assert policy.affine(prompt, ["r2", "r3"]) == []  # r2 holds 80: under half
    queue = {"r1": 9, "r2": 1, "r3": 5}
    assert policy.affine(prompt, ["r1", "r2", "r3"], queue.get) == []  # 8 more than the least busy: too many
    assert policy.affine(prompt, ["r1", "r3"], queue.get) == ["r1"]
    policy.index.insert(prompt, "r3")
    assert policy.affine(prompt, ["r1", "r2", "r3"]) == ["r1", "r3"]  # a tie: the shorter queue decides
    assert policy.spread(["r1", "r2", "r4"]) == ["r4", "r2", "r1"]  # the fewest prefixes first
    for bad in ({"min_match": -1}, {"match_ratio": 2}, {"max_imbalance": -1}, {"index_chars": 1.5}):
        with pytest.raises(ValueError):
            PrefixPolicy(**bad)


# ---- the router in Ray's routing loop -----------------------------------------------------------------

class FakeReplica:
    """What Ray's RequestRouter needs of a running replica; its queue is what the test says."""

    def __init__(self, replica_id):
        self.replica_id, self.node_id, self.availability_zone = replica_id, "node", None
        self.multiplexed_model_ids, self.max_ongoing_requests, self.is_cross_language = set(), 100, False
        self.queue_len = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    def push_proxy_handle(self, handle) -> None:
        pass


def make_router(kind: type, replicas: int, **options):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    deployment = DeploymentID("GSSServer", "gss")
    router = kind(deployment_id=deployment, handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True)
    router.initialize_state(**options)
    fakes = [FakeReplica(ReplicaID(f"r{i}", deployment)) for i in range(replicas)]
    router.update_replicas(fakes)
    return router, fakes


async def route(router, prompt: list[int]):
    """One request through Ray's routing loop, as a handle sends it: the replica chosen, told to the router."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    request_id = uuid.uuid4().hex
    pending = PendingRequest(args=[SimpleNamespace(prefix_key=prefix_key({"prompt": prompt}))], kwargs={},
                             metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id))
    replica = await asyncio.wait_for(router._choose_replica_for_request(pending), 10)
    router.on_send_request(replica.replica_id)
    router.on_request_routed(pending, replica.replica_id, None)
    return replica


def workload(seed: int = 0) -> list[list[list[int]]]:
    """Rounds of requests: one with each group's prefix, then rounds that each extend it."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(PREFIX)] for _ in range(GROUPS)]
    return [prefixes] + [[p + [rng.randrange(256) for _ in range(EXTRA)] for p in prefixes] for _ in range(FOLLOW_UPS)]


async def serve_rounds(router, fakes) -> tuple[float, list[list[str]]]:
    """(the share of prompt tokens a replica had cached, which replica each request went to, by round and group)"""
    seen = {f.replica_id: [] for f in fakes}  # a replica's prompts: what its engine keeps
    cached = total = 0
    placed = []
    for number, prompts in enumerate(workload()):
        if number == 0:  # the new prefixes one at a time: Ray's default would place them at random
            chosen = [await route(router, p) for p in prompts]
        else:  # then each round sent together
            chosen = await asyncio.gather(*(route(router, p) for p in prompts))
        placed.append([r.replica_id.unique_id for r in chosen])
        for prompt, replica in zip(prompts, chosen):
            hit = max((len(s) for s in seen[replica.replica_id] if prompt[:len(s)] == s), default=0)
            cached, total = cached + hit, total + len(prompt)
            seen[replica.replica_id].append(prompt)
        for f in fakes:  # the round ends: every queue empties
            router.on_new_queue_len_info(f.replica_id, 0)
    return cached / total, placed


def test_requests_that_share_a_prefix_go_where_it_went_and_new_prefixes_spread():
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    async def compare():
        random.seed(1)
        affinity, placed = await serve_rounds(*make_router(PrefixAffinityRouter, 2))
        default, _ = await serve_rounds(*make_router(PowerOfTwoChoicesRequestRouter, 2))
        return affinity, placed, default

    affinity, placed, default = asyncio.run(compare())
    ideal = GROUPS * FOLLOW_UPS * PREFIX / (GROUPS * PREFIX + GROUPS * FOLLOW_UPS * (PREFIX + EXTRA))
    print(f"prompt tokens a replica had cached: prefix affinity {affinity:.1%}, Ray's default {default:.1%}, ideal {ideal:.1%}")
    assert affinity == pytest.approx(ideal)
    assert default < ideal - 0.15
    assert all(later == placed[0] for later in placed[1:])  # every group stays where its prefix went
    assert sorted(placed[0].count(r) for r in set(placed[0])) == [3, 3]  # and the six prefixes went three and three


def test_a_busy_or_gone_replica_loses_its_prefixes_requests():
    async def run():
        router, (r0, r1) = make_router(PrefixAffinityRouter, 2, max_imbalance=4)
        prompt = list(range(200))
        first = await route(router, prompt)
        other = r1 if first is r0 else r0
        router.on_new_queue_len_info(first.replica_id, 0)
        assert await route(router, prompt + [1]) is first
        # 10 more requests than the other: the prefix is not worth the wait
        router.on_new_queue_len_info(first.replica_id, 10)
        router.on_new_queue_len_info(other.replica_id, 0)
        assert await route(router, prompt + [2]) is other
        # both hold it now (the other was sent it): the shorter queue decides between them
        router.on_new_queue_len_info(first.replica_id, 3)
        router.on_new_queue_len_info(other.replica_id, 1)
        assert await route(router, prompt + [3]) is other
        # a replica that leaves takes its prefixes with it
        router.update_replicas([first])
        assert router.policy.index.replicas() == [first.replica_id]
        router.on_replica_actor_died(first.replica_id)
        assert router.policy.index.replicas() == []
        # a request without a key (GET /health, /v1/models) goes by load alone
        from ray.serve._private.common import RequestMetadata
        from ray.serve.request_router import PendingRequest

        router.update_replicas([r0, r1])
        plain = PendingRequest(args=[SimpleNamespace(prefix_key=None)], kwargs={},
                               metadata=RequestMetadata(request_id="h", internal_request_id="h"))
        ranks = await router.choose_replicas([r0, r1], plain)
        assert len(ranks) == 1 and sorted(r.replica_id.unique_id for r in ranks[0]) == ["r0", "r1"]

    asyncio.run(run())
