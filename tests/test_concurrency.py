"""GSSRunner, Decoder and Generator shared by many threads give exactly what they give alone.

Both kinds of state: the example checkpoint (GatedDsConvLM: appended state, io-bound buffers, prompts
over 128 tokens through prefill.onnx) and a GatedStateSpacesLM (a recurrent state replaced by each call).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gss_runtime import Decoder, Generator, GSSRunner, Sampling

THREADS = 8
ROUNDS = 4  # each job runs this many times, interleaved with all the others


def jobs(runner: GSSRunner, decoder: Decoder, generator: Generator) -> list:
    """(name, call) pairs of mixed lengths and batch sizes; each call returns arrays or lists to compare."""
    rng = np.random.default_rng(5)
    vocab = runner.config["num_tokens"]

    def ids(batch: int, length: int) -> np.ndarray:
        return rng.integers(0, vocab, (batch, length), dtype=np.int64)

    def steps(prompts, n):
        logits, state = decoder.prefill(prompts)
        out = [logits]
        for _ in range(n):
            logits, state = decoder.step(logits.argmax(-1), state)
            out.append(logits)
        return out

    made = []
    for b, n in [(1, 1), (3, 7), (2, 130), (1, 300)]:
        x = ids(b, n)
        made.append((f"logits {b}x{n}", lambda x=x: runner.logits(x)))
    made.append(("next token", lambda p=ids(1, 45)[0]: runner.next_token_distribution(p, top=7)))
    ragged = [list(ids(1, n)[0]) for n in (3, 17, 140)]
    made.append(("decoder ragged 3/17/140 + 6 steps", lambda: steps(ragged, 6)))
    made.append(("decoder 1 + 10 steps", lambda p=[list(ids(1, 1)[0])]: steps(p, 10)))
    made.append(("greedy batch of 2", lambda: generator.generate(ragged[:2], 12).tokens))
    hot = Sampling(temperature=0.9, top_k=40, top_p=0.95)
    made.append(("sampled batch of 3", lambda: generator.generate(ragged, 10, sampling=hot, seed=4).tokens))
    made.append(("sampled 1, long prompt", lambda p=list(ids(1, 200)[0]): generator.generate(p, 8, sampling=hot, seed=9).tokens))
    return made


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return a == b


@pytest.fixture(scope="module", params=["dsconv", "gss"])
def model(request, example_onnx, family_exports):
    return example_onnx if request.param == "dsconv" else family_exports("gss", "onnx")


def test_shared_objects_across_threads_equal_alone(model):
    runner, decoder, generator = GSSRunner(model, provider="cpu"), Decoder(model, provider="cpu"), Generator(model, provider="cpu")
    work = jobs(runner, decoder, generator)
    alone = {name: call() for name, call in work}
    order = [job for _ in range(ROUNDS) for job in work]
    np.random.default_rng(1).shuffle(order)
    start = threading.Barrier(THREADS, timeout=120)

    def run(job):
        name, call = job
        return name, call()

    def first(job):  # every thread starts together, so the first calls overlap
        start.wait()
        return run(job)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(first, order[:THREADS])) + list(pool.map(run, order[THREADS:]))
    assert len(results) == ROUNDS * len(work) and len(order) >= THREADS * 3
    wrong = [name for name, got in results if not same(got, alone[name])]
    assert not wrong, wrong


def test_one_state_fed_from_many_threads_branches(model):
    """8 threads step the same state with different tokens at once: each equals that step taken alone."""
    decoder = Decoder(model, provider="cpu")
    _, state = decoder.prefill([list(range(40, 90))])
    tokens = list(range(100, 100 + THREADS))
    alone = [decoder.step([t], state)[0] for t in tokens]
    start = threading.Barrier(THREADS, timeout=120)

    def step(token):
        start.wait()
        logits, after = decoder.step([token], state)
        return logits, decoder.step([token], after)[0]  # and the branch goes on from its own slots

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(step, tokens))
    assert all(np.array_equal(got, want) for (got, _), want in zip(results, alone))
    seconds = [decoder.step([t], decoder.step([t], state)[1])[0] for t in tokens]
    assert all(np.array_equal(got, want) for (_, got), want in zip(results, seconds))
