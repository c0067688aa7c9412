"""What continuous batching rests on, in process: states that join and leave a batch exactly, and a
server that says when it cannot serve (loading, a dead step loop, shutting down)."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import LONG_PROMPT
from serve_support import wait_for


@pytest.fixture(scope="module")
def folders(example_onnx, family_exports):
    return {"dsconv": example_onnx, "gss": family_exports("gss", "onnx"), "mhesa": family_exports("mhesa", "onnx")}


def greedy_alone(decoder, prompt, new):
    logits, state = decoder.prefill([prompt])
    out = []
    for _ in range(new):
        out.append(int(logits[0].argmax()))
        logits, state = decoder.step([out[-1]], state)
    return out


@pytest.mark.parametrize("family", ["dsconv", "gss", "mhesa"])
def test_states_join_and_leave_a_batch_exactly(folders, family):
    """A short row joins a long one mid-generation (and a long one a short one), the long one leaves:
    every row's greedy tokens equal its solo run."""
    from gss_runtime import Decoder

    decoder = Decoder(folders[family], provider="cpu", threads=1)
    prompts = [list(LONG_PROMPT[:200]), list(LONG_PROMPT[50:53]), list(LONG_PROMPT[10:150])]
    want = [greedy_alone(decoder, p, 12) for p in prompts]
    got = [[] for _ in prompts]
    logits, state = decoder.prefill([prompts[0]])
    rows = [0]
    for step in range(24):
        if step in (4, 6):  # rows 1 and 2 arrive while row 0 is running
            new_logits, new_state = decoder.prefill([prompts[len(rows)]])
            logits, state = np.concatenate([logits, new_logits]), state.join(new_state)
            rows.append(len(rows))
        tokens = [int(row.argmax()) for row in logits]
        for r, t in zip(rows, tokens):
            got[r].append(t)
        keep = [i for i, r in enumerate(rows) if len(got[r]) < 12]
        if not keep:
            break
        if len(keep) < len(rows):  # a row leaves; an appended state also drops the slots nobody needs
            before, long_leaves = getattr(state, "length", None), 0 in rows and 0 not in [rows[i] for i in keep]
            rows, logits, state = [rows[i] for i in keep], logits[keep], state.rows(np.array(keep))
            if before is not None and long_leaves:
                assert state.length < before
        logits, state = decoder.step([tokens[i] for i in keep], state)
    assert got == want


def test_health_is_503_while_loading_and_after_the_step_loop_dies(folders):
    from gss_runtime.serve.app import ModelHost, build_app

    host = ModelHost(folders["mhesa"], threads=1)
    gate, load = threading.Event(), host.load
    host.load = lambda: (gate.wait(30), load())[1]
    with TestClient(build_app(host)) as http:
        assert http.get("/health").status_code == 503
        refused = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert refused.status_code == 503 and "loading" in refused.json()["error"]["message"]
        gate.set()
        assert wait_for(lambda: http.get("/health").status_code == 200)
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200

        def broken(*args, **kwargs):
            raise RuntimeError("onnxruntime failed")

        host.engine.decoder.step = broken
        failed = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
        assert failed.status_code == 500 and "onnxruntime failed" in failed.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and "onnxruntime failed" in health.json()["message"]
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 503


def test_a_stopping_engine_ends_its_requests(folders):
    """What gss-serve does on SIGTERM: running and waiting requests end with 503 instead of hanging."""
    from gss_runtime.serve.app import ModelHost, build_app

    host = ModelHost(folders["mhesa"], threads=1, max_batch=1).load()
    with TestClient(build_app(host, load=False)) as http:
        results = []
        asks = [threading.Thread(target=lambda: results.append(
            http.post("/v1/completions", json={"prompt": "a", "max_tokens": 10**9}).status_code)) for _ in range(2)]
        for t in asks:
            t.start()
        assert wait_for(lambda: host.engine.running == 1 and host.engine.waiting == 1)
        host.stop()
        for t in asks:
            t.join(30)
        assert results == [503, 503]


def test_gss_serve_refuses_a_bad_model_folder_in_one_line(tmp_path):
    command = Path(sys.executable).with_name("gss-serve")
    proc = subprocess.run([str(command), str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model path") and proc.stderr.count("\n") == 1, proc.stderr
    proc = subprocess.run([str(command), str(tmp_path), "--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--max-batch" in proc.stderr and "Traceback" not in proc.stderr


def test_the_server_runs_without_torch(folders, lang_reference):
    """gss-serve's app, engine and Ray deployment import no torch (nor gss_export), and serve eager's tokens."""
    import json

    from conftest import LANG_NEW, LANG_PROMPT, run_without_torch

    script = f"""
import json, time
from fastapi.testclient import TestClient
import gss_runtime.serve.ray_app
from gss_runtime.serve.app import ModelHost, build_app
with TestClient(build_app(ModelHost({str(folders["dsconv"])!r}, threads=1))) as http:
    while http.get("/health").status_code != 200:
        time.sleep(0.05)
    reply = http.post("/v1/completions", json={{"prompt": {LANG_PROMPT!r}, "max_tokens": {LANG_NEW}, "temperature": 0}})
print(json.dumps(reply.json()["choices"][0]["token_ids"]))
"""
    done = run_without_torch(script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == lang_reference


class Collector:
    """An engine channel that records each request's tokens and end, and what the engine holds at every step."""

    def __init__(self, engine=None):
        self.engine, self.tokens, self.done, self.order, self.held = engine, {}, threading.Semaphore(0), [], []

    def __call__(self, items):
        from gss_runtime.serve.engine import Finished, Tokens

        self.held.append((self.engine.reserved_bytes, self.engine.held_bytes, self.engine.running))
        for request, event in items:
            if isinstance(event, Tokens):
                self.tokens.setdefault(request.tag, []).extend(event.ids)
            elif isinstance(event, Finished):
                self.order.append(request.tag)
                self.done.release()



def test_a_long_completion_keeps_little_room_and_stays_exact(folders, monkeypatch):
    """A batch keeps `headroom` free slots, not every slot its rows may feed (a step multiplies the room too),
    and its buffers grow by as much, within what its rows may still feed, when the room runs out: 299 feeds
    after a 150-token prompt make one growth. The budget counts the whole extent, which the buffers never
    pass; the tokens are the solo run's."""
    from gss_runtime import Decoder
    from gss_runtime.decoder import _Slots, headroom
    from gss_runtime.serve.engine import Completion, Engine, Request

    decoder = Decoder(folders["dsconv"], provider="cpu", threads=1)
    capacities, reserve = [], _Slots.reserve

    def spy(slots, needed, *args):
        reserve(slots, needed, *args)
        capacities.append((needed, slots.capacity))

    monkeypatch.setattr(_Slots, "reserve", spy)
    engine = Engine(decoder, max_batch=4, prefix_cache_memory=None, state_memory=1 << 30).start()
    seen = Collector(engine)
    prompt = list(LONG_PROMPT[:150])
    try:
        engine.submit([Request(Completion(prompt, 300), seen, tag=0)])
        assert seen.done.acquire(timeout=120)
    finally:
        engine.stop()
    monkeypatch.undo()
    assert all(needed <= capacity <= needed + headroom(needed) for needed, capacity in capacities), capacities
    grown = sorted({capacity for needed, capacity in capacities if needed > 2})  # (not the engine's probe of a step)
    assert grown == [151 + 256, 151 + 299], grown  # the prefill's, then one growth, to no more than the budget counts
    reserved, held, _ = zip(*seen.held)
    # the budget: every slot the row may fill (and its step's working memory, which the engine measured)
    assert max(reserved) == (151 + 299) * decoder.config["depth"] * (128 + 4) * 4 + engine.cost.work_bytes
    assert all(h <= r for r, h in zip(reserved, held)) and min(held) < max(reserved)
    assert seen.tokens[0] == greedy_alone(decoder, prompt, 300)

def test_the_state_budget_holds_and_every_row_is_exact(folders):
    """GatedDsConvLM under a budget that fits two long requests: what the batches can reach never passes the
    budget, what they hold never passes that, requests wait instead, and every one gets its solo tokens."""
    from gss_runtime import Decoder
    from gss_runtime.serve.budget import StateCost
    from gss_runtime.serve.engine import Completion, Engine, Request, TooLarge

    decoder = Decoder(folders["dsconv"], provider="cpu", threads=1)
    prompts = [list(LONG_PROMPT[i : i + 150 + 10 * i]) for i in range(6)] + [list(LONG_PROMPT[:5]), list(LONG_PROMPT[7:12])]
    new = [12, 9, 14, 6, 10, 12, 3, 4]
    cost = StateCost.of(decoder)
    budget = 2 * cost.bytes(1, 220 + 14)  # about two of the long ones at once
    engine = Engine(decoder, max_batch=8, state_memory=budget).start()
    seen = Collector(engine)
    try:
        with pytest.raises(TooLarge, match="state-memory"):
            engine.submit([Request(Completion(list(LONG_PROMPT[:300]), 1000), seen)])
        engine.submit([Request(Completion(p, n), seen, tag=i) for i, (p, n) in enumerate(zip(prompts, new))])
        for _ in prompts:
            assert seen.done.acquire(timeout=120)
    finally:
        engine.stop()
    assert all(reserved <= budget and held <= reserved for reserved, held, _ in seen.held), max(seen.held)
    assert max(running for _, _, running in seen.held) < len(prompts)  # some had to wait
    assert max(reserved for reserved, _, _ in seen.held) > budget // 2
    for i, (p, n) in enumerate(zip(prompts, new)):
        assert seen.tokens[i] == greedy_alone(decoder, p, n), i
    # the two short ones overtook long ones waiting for memory: they end before the last long one starts
    assert seen.order.index(6) < seen.order.index(5) and seen.order.index(7) < seen.order.index(5)


@pytest.mark.parametrize("family", ["dsconv", "gss"])
def test_n_samples_fork_one_prefill(folders, family):
    """A group's rows share one prefill; each equals its solo run with its own seed, greedy or sampled."""
    from gss_runtime import Decoder, Sampling
    from gss_runtime.serve.engine import Completion, Engine, Request

    decoder = Decoder(folders[family], provider="cpu", threads=1)
    prefills = []
    real = decoder.prefill
    decoder.prefill = lambda prompts, **kw: (prefills.append(len(prompts)), real(prompts, **kw))[1]
    engine = Engine(decoder, max_batch=8).start()
    seen = Collector(engine)
    sampling = Sampling(temperature=0.9)
    group = object()
    try:
        engine.submit([Request(Completion(list(LONG_PROMPT[:140]), 8, sampling, seed=9 + j), seen, tag=j, group=group)
                       for j in range(4)])
        for _ in range(4):
            assert seen.done.acquire(timeout=120)
        assert prefills == [1]
        for j in range(4):
            alone = Collector(engine)
            engine.submit([Request(Completion(list(LONG_PROMPT[:140]), 8, sampling, seed=9 + j), alone, tag=j)])
            assert alone.done.acquire(timeout=120)
            assert alone.tokens[j] == seen.tokens[j]
    finally:
        engine.stop()


def test_a_new_batch_steps_in_its_prefill_buffers(folders, monkeypatch):
    """Cold prompts that start a batch of their own are prefilled with room for every token they will feed:
    no repack and no growth of the state's buffers, from the first step to the last; tokens still exact."""
    from gss_runtime import Decoder
    from gss_runtime.decoder import DecoderState, _Slots
    from gss_runtime.serve.engine import Completion, Engine, Request

    decoder = Decoder(folders["dsconv"], provider="cpu", threads=1)
    copies = []
    repack, reserve = DecoderState.repack, _Slots.reserve
    monkeypatch.setattr(DecoderState, "repack", lambda self, *a, **k: (copies.append("repack"), repack(self, *a, **k))[1])

    def spy(slots, *args):
        before = slots.arrays[0]
        reserve(slots, *args)
        if slots.arrays[0] is not before:
            copies.append(f"grown to {slots.capacity}")

    monkeypatch.setattr(_Slots, "reserve", spy)
    engine = Engine(decoder, max_batch=8, prefix_cache_memory=None).start()
    seen = Collector(engine)
    prompts = [list(LONG_PROMPT[:200]), list(LONG_PROMPT[:150])]
    try:
        engine.submit([Request(Completion(p, 30), seen, tag=i) for i, p in enumerate(prompts)])
        for _ in prompts:
            assert seen.done.acquire(timeout=120)
    finally:
        engine.stop()
    # each prompt's prefill allocates once (prompt + 1 padding slot + 29 feeds) and nothing is copied after
    # (the engine gives prompts of different lengths batches of their own, or one prefill: either way no repack)
    assert sorted(copies) in (["grown to 180", "grown to 230"], ["grown to 230"]), copies
    monkeypatch.undo()
    for i, p in enumerate(prompts):
        assert seen.tokens[i] == greedy_alone(decoder, p, 30), i
