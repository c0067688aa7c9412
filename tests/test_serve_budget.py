"""gss-serve's decoder-state budget (--state-memory) against a live server and a burst of long prompts.

Each family gets a model whose state is large per token (GatedDsConvLM: 32.8 KB a slot) or per row
(GatedStateSpacesLM: 16 MiB), random weights from upstream's classes, and a server whose budget fits
about 4 of the burst's requests. The burst: 16 requests at once, more than --max-batch plus
--max-queue hold, so some may get 429; every other one must come back whole, greedy tokens equal to
a solo run, while /metrics never shows more state reserved than the budget, nor more held than
reserved. Then the server's peak resident memory (VmHWM) is held against its memory once warm plus
the budget plus `margin` (test_peak_memory_is_warm_memory_plus_the_budget). A row's reservation is its
state plus a step's working memory per row, which the engine measures when it starts (for this
GatedStateSpacesLM about 2.5 times its 16 MiB state); the test measures it the same way, in a process of
its own, to size the budget.

Both models are exported once per module, in parallel (two processes), and each server runs its
burst once (`served`): the tests read what it recorded.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_support import live_server, metrics
from serve_support import process_memory as memory

MiB = 2**20


@dataclass(frozen=True)
class Case:
    upstream: str  # the class in gated_state_spaces_pytorch
    kwargs: dict
    max_seq_len: int
    prompt_lengths: tuple[int, ...]  # the burst's prompts; the warm-up uses the longest
    max_tokens: int

    def state_bytes(self, prompt: int, max_tokens: int, rows: int = 1) -> int:
        """What the engine reserves for `rows` samples of one request (budget.py, by hand)."""
        k = self.kwargs
        if self.upstream == "GatedDsConvLM":  # a slot per token: the prompt, then max_tokens - 1 fed back, + 1
            slots = min(prompt + max_tokens, self.max_seq_len + 1)
            return rows * slots * 4 * k["depth"] * (k["dim_dsconv"] + k["heads"])
        return rows * 4 * k["depth"] * k["dss_kernel_H"] * 2 * k["dss_kernel_N"]  # (H, 2N) per layer


BURST = 16
CASES = {
    # 4 * depth * (dim_dsconv + heads) = 32,832 bytes a slot: an 1,800-token request holds 57 MiB
    "dsconv": Case("GatedDsConvLM", dict(num_tokens=256, dim=64, depth=4, heads=4, dim_dsconv=2048, dim_expansion_factor=2),
                   max_seq_len=2048, prompt_lengths=tuple(1500 + (i * 97) % 301 for i in range(BURST)), max_tokens=16),
    # depth * H * 2N * 4 = 16 MiB a row, whatever the prompt
    "gss": Case("GatedStateSpacesLM", dict(num_tokens=256, dim=64, depth=2, dss_kernel_H=1024, dss_kernel_N=1024,
                                           dim_expansion_factor=2), max_seq_len=1024,
                prompt_lengths=tuple(200 + (i * 53) % 201 for i in range(BURST)), max_tokens=16),
}
FITS = 4.5  # the budget: this many of the burst's largest reservation (4 always fit, a 5th only of shorter prompts)
MAX_BATCH, MAX_QUEUE = 8, 4  # 12 of the 16 are taken at once; the budget, not --max-batch, limits what runs


def margin(largest: int) -> int:
    """What VmHWM may exceed the warm server's VmRSS plus the budget by: glibc's slack, about one request's state
    (`largest`, the burst's largest reservation), and 16 MiB for everything else a burst touches (16 requests' JSON
    and replies, the rows' logits, the scrapes).

    Measured (GatedDsConvLM below, 2 cores, 6 runs): the burst's peak is 270-301 MiB over the warm VmRSS for a
    255 MiB budget of which at most 211-214 MiB was reserved: 59-87 MiB over what the state held, 1 to 1.5 times
    the largest request's 57 MiB. It is glibc's: the state's per-layer buffers (15 MB for a row of 1,800 slots)
    fall under its dynamic mmap threshold once a first one is freed, so later ones live in heaps that fragment;
    with MALLOC_MMAP_THRESHOLD_=1048576 in the server's environment the same bursts peak 207-208 MiB over, under
    what was reserved."""
    return largest + 16 * MiB


EXPORT = """
import sys, torch, gated_state_spaces_pytorch as upstream
from gss_export.checkpoint import load_checkpoint
from gss_export.export import export_model
name, kwargs, max_seq_len, out = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(21)
extra = {"max_seq_len": max_seq_len} if name == "GatedDsConvLM" else {}
torch.save(getattr(upstream, name)(**kwargs, **extra).state_dict(), out + "/model.pt")
export_model(load_checkpoint(out + "/model.pt", max_seq_len=max_seq_len).model, "onnx", out + "/export", validate=False)
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """family -> its export folder; both exported at once, each in its own process (the slow part of the module)."""
    folders, procs = {}, {}
    for family, case in CASES.items():
        folders[family] = tmp_path_factory.mktemp(f"budget_{family}")
        procs[family] = subprocess.Popen([sys.executable, "-c", EXPORT, case.upstream, repr(case.kwargs), str(case.max_seq_len),
                                          str(folders[family])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for family, proc in procs.items():
            output, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"exporting {family} failed:\n{output[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {family: folder / "export" for family, folder in folders.items()}


PROBE = """
import sys
from gss_runtime import Decoder
from gss_runtime.serve.budget import probe_step_memory
print(probe_step_memory(Decoder(sys.argv[1], provider="cpu", threads=1)))
"""


@pytest.fixture(scope="module")
def work(exports) -> dict[str, int]:
    """family -> a step's working memory per row, measured as the engine measures it (in a fresh process)."""
    out = {}
    for family, folder in exports.items():
        done = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out[family] = int(done.stdout.split()[-1])
    return out


@dataclass
class Served:
    """What one server did: its budget, the warm-up's memory, the burst's replies and samples."""

    case: Case
    folder: Path
    budget: int
    largest: int  # the burst's largest reservation
    prompts: list[list[int]]
    work: int  # a step's working memory per row, as the engine measures it
    warm: dict = field(default_factory=dict)  # memory() after the warm-up
    replies: list = field(default_factory=list)  # (status, body) per burst request
    samples: list = field(default_factory=list)  # (reserved, used, waiting, running, VmRSS) during the burst
    peak: dict = field(default_factory=dict)  # memory() after the burst
    seconds: float = 0.0
    too_large: tuple = ()  # (status, body) of a request that can never fit
    after: tuple = ()  # (status, body) of a request sent after it


@pytest.fixture(scope="module", params=list(CASES))
def served(request, exports, work) -> Served:
    family = request.param
    case, folder = CASES[family], exports[family]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in case.prompt_lengths]
    largest = max(case.state_bytes(n, case.max_tokens) for n in case.prompt_lengths) + work[family]
    budget = int(FITS * largest)
    run = Served(case, folder, budget, largest, prompts, work[family])
    # the prefix cache's snapshots are a budget of their own (--prefix-cache-memory; test_serve_prefix_cache.py):
    # off here, so that the peak is the state budget's alone
    options = ("--state-memory", str(budget), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--threads", "1",
               "--no-prefix-cache")
    with live_server(folder, *options) as url:
        pid = url.process.pid
        body = lambda prompt, **more: {"prompt": prompt, "max_tokens": case.max_tokens, "temperature": 0, **more}
        # warm: twice the longest prompt, one request at a time. onnxruntime's arena keeps what a prefill's
        # activations took, and a shape's second run takes them again as one block (its memory pattern, planned
        # on the first run): the arena holds both from then on, and that is the server's resident memory once warm
        longest = max(case.prompt_lengths)
        for seed in (1, 2):
            warm = np.random.default_rng(seed).integers(0, 256, longest).tolist()
            reply = httpx.post(f"{url}/v1/completions", json=body(warm), timeout=120)
            assert reply.status_code == 200, reply.text
        run.warm = memory(pid)
        assert metrics(url)["gss_state_budget_bytes"] == budget

        stop = threading.Event()

        def sample():
            while not stop.is_set():
                m = metrics(url)
                run.samples.append((m["gss_state_reserved_bytes"], m["gss_state_used_bytes"], m["gss_num_requests_waiting"],
                                    m["gss_num_requests_running"], memory(pid)["VmRSS"]))
                time.sleep(0.02)

        async def burst():
            async with httpx.AsyncClient(timeout=300) as client:
                async def one(prompt):
                    reply = await client.post(f"{url}/v1/completions", json=body(prompt))
                    return reply.status_code, reply.json()
                return await asyncio.gather(*(one(p) for p in prompts))

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        try:
            run.replies = asyncio.run(burst())
        finally:
            run.seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
        run.peak = memory(pid)
        # n samples of the longest prompt, up to max_seq_len: 5 rows never fit a budget of 4.5 (dsconv's one row cannot
        # exceed it: max_seq_len caps its slots)
        never = body(prompts[int(np.argmax(case.prompt_lengths))], n=5, max_tokens=case.max_seq_len - longest)
        reply = httpx.post(f"{url}/v1/completions", json=never, timeout=30)
        run.too_large = (reply.status_code, reply.json())
        reply = httpx.post(f"{url}/v1/completions", json=body(prompts[0]), timeout=120)
        run.after = (reply.status_code, reply.json())
    print(f"\n{family}: {report(run)}")
    return run


def report(run: Served) -> str:
    reserved = max(s[0] for s in run.samples)
    return json.dumps({
        "budget_mib": run.budget / MiB, "work_per_row_mib": run.work / MiB, "warm_rss_mib": run.warm["VmRSS"] / MiB, "warm_hwm_mib": run.warm["VmHWM"] / MiB,
        "peak_hwm_mib": run.peak["VmHWM"] / MiB, "peak_over_warm_rss_mib": (run.peak["VmHWM"] - run.warm["VmRSS"]) / MiB,
        "max_reserved_mib": reserved / MiB, "max_used_mib": max(s[1] for s in run.samples) / MiB,
        "max_waiting": max(s[2] for s in run.samples), "max_running": max(s[3] for s in run.samples),
        "statuses": sorted(s for s, _ in run.replies), "burst_s": round(run.seconds, 2), "samples": len(run.samples),
    })


def test_the_burst_is_answered_within_the_budget(served):
    """Every request answered (200, or 429 when running and queue are full) with its solo tokens; the gauges
    never show more reserved than the budget, or more held than reserved; the budget held requests back."""
    from gss_runtime import Generator

    statuses = [status for status, _ in served.replies]
    assert set(statuses) <= {200, 429}, served.replies
    # a 429 only when MAX_BATCH + MAX_QUEUE are already in: at least that many are taken
    assert statuses.count(200) >= MAX_BATCH + MAX_QUEUE, statuses
    for status, body in served.replies:
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
        else:
            (choice,) = body["choices"]
            assert len(choice["token_ids"]) == served.case.max_tokens and choice["finish_reason"] == "length"
    generator = Generator(served.folder, provider="cpu", threads=1)
    answered = [i for i, (status, _) in enumerate(served.replies) if status == 200]
    for i in (answered[0], answered[len(answered) // 2], answered[-1]):
        want = generator.generate(served.prompts[i], served.case.max_tokens).tokens[0]
        assert served.replies[i][1]["choices"][0]["token_ids"] == want, f"request {i}"

    reserved = [s[0] for s in served.samples]
    used = [s[1] for s in served.samples]
    assert len(served.samples) >= 20, "too few /metrics samples to judge the gauges"
    assert max(reserved) <= served.budget, report(served)
    # one scrape reads both from one moment of the engine
    assert all(u <= r for r, u in zip(reserved, used)), report(served)
    # the budget mattered: it filled (at least half of it reserved at once) and requests waited for it
    assert max(reserved) >= served.budget / 2, report(served)
    assert max(s[2] for s in served.samples) > 0, report(served)
    smallest = min(served.case.state_bytes(n, served.case.max_tokens) for n in served.case.prompt_lengths) + served.work
    assert max(s[3] for s in served.samples) <= served.budget // smallest, report(served)


def test_peak_memory_is_warm_memory_plus_the_budget(served):
    """The server's peak resident memory stays within what it held once warm (weights, runtime, onnxruntime's
    arenas as the warm-up grew them: its VmRSS, so not the warm-up's own state) plus the state budget, plus `margin`
    (one request's state and 16 MiB)."""
    peak, warm = served.peak["VmHWM"], served.warm["VmRSS"]
    assert peak <= warm + served.budget + margin(served.largest), report(served)


def test_a_request_that_can_never_fit_gets_400_and_the_server_goes_on(served):
    status, body = served.too_large
    assert status == 400, body
    assert "--state-memory" in body["error"]["message"] and body["error"]["param"] == "max_tokens", body
    status, body = served.after
    assert status == 200 and len(body["choices"][0]["token_ids"]) == served.case.max_tokens, body
