"""gss-serve, live on loopback, through the `openai` client and plain HTTP (httpx).

Exactness against upstream eager (greedy, every family), continuous batching against solo runs,
overload, bad requests, client disconnects, health and metrics.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from conftest import LANG_NEW, LANG_PROMPT, LONG_PROMPT
from serve_support import live_server, metrics, wait_for

FAMILIES = ("dsconv", "gss", "mhesa")


@pytest.fixture(scope="module")
def folders(example_onnx, family_exports):
    """family -> an ONNX export: the bundled example (GatedDsConvLM) and the small recurrent models."""
    return {"dsconv": example_onnx, "gss": family_exports("gss", "onnx"), "mhesa": family_exports("mhesa", "onnx")}


@pytest.fixture(scope="module")
def servers(folders):
    """family -> the URL of a live gss-serve on that export (8 running, 16 waiting)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {f: stack.enter_context(live_server(folders[f], "--max-batch", "8", "--max-queue", "16", "--threads", "1"))
               for f in FAMILIES}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def model_name(url: str) -> str:
    return client(url).models.list().data[0].id


@pytest.mark.parametrize("family", FAMILIES)
def test_completions_equal_eager_greedy(servers, family, lang_reference, family_references):
    """Streamed and not, the 24 greedy tokens are upstream eager's; the text is their bytes."""
    want = lang_reference if family == "dsconv" else family_references[family]
    api, name = client(servers[family]), model_name(servers[family])
    prompt = bytes(LANG_PROMPT).decode()
    whole = api.completions.create(model=name, prompt=prompt, max_tokens=LANG_NEW, temperature=0)
    (choice,) = whole.choices
    assert choice.token_ids == want
    assert choice.text == bytes(want).decode("utf-8", errors="replace")
    assert choice.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (23, 24, 47)
    chunks = list(api.completions.create(model=name, prompt=prompt, max_tokens=LANG_NEW, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    pieces = [c for c in chunks if c.choices]
    assert sum((c.choices[0].token_ids for c in pieces), []) == want
    assert "".join(c.choices[0].text for c in pieces) == choice.text
    assert [c.choices[0].finish_reason for c in pieces][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices
    # ids in, ids out; a token budget that ends at a stop id
    by_ids = api.completions.create(model=name, prompt=LANG_PROMPT, max_tokens=LANG_NEW, temperature=0,
                                    extra_body={"stop_token_ids": [want[5]]})
    assert by_ids.choices[0].token_ids == want[: want.index(want[5])]
    assert by_ids.choices[0].finish_reason == "stop"


def solo(folder, prompt, max_new, temperature=0.0, seed=None):
    from gss_runtime import Generator, Sampling

    return Generator(folder, provider="cpu", threads=1).generate(prompt, max_new, sampling=Sampling(temperature=temperature),
                                                                 seed=seed).tokens[0]


@pytest.mark.parametrize("family", ["dsconv", "gss"])
def test_concurrent_requests_equal_their_solo_runs(servers, folders, family):
    """16 requests of different prompt lengths and budgets, sent at once (8 run, 8 wait and join as
    others leave; some go through prefill.onnx): each gets what it gets alone. Four are sampled with a seed."""
    rng = np.random.default_rng(3)
    lengths = [1, 2, 5, 17, 40, 64, 100, 129, 200, 300, 3, 9, 33, 70, 150, 260]
    cases = [dict(prompt=list(LONG_PROMPT[:n]), max_tokens=int(rng.integers(1, 40)),
                  temperature=0.8 if i % 4 == 3 else 0.0, seed=i) for i, n in enumerate(lengths)]

    def ask(case):
        with httpx.Client(timeout=120) as http:
            reply = http.post(f"{servers[family]}/v1/completions", json=case)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    for case, tokens in zip(cases, got):
        want = solo(folders[family], case["prompt"], case["max_tokens"], case["temperature"], case["seed"])
        assert tokens == want, (len(case["prompt"]), case)


def test_overload_answers_429(folders):
    """One running, one waiting: the third request is refused with Retry-After, and the server goes on."""
    with live_server(folders["mhesa"], "--max-batch", "1", "--max-queue", "1", "--threads", "1") as url:
        body = {"prompt": "x", "max_tokens": 100000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as first, httpx.Client(timeout=60) as second:
            with first.stream("POST", f"{url}/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
                next(lines)
                with second.stream("POST", f"{url}/v1/completions", json=body):
                    assert wait_for(lambda: metrics(url)["gss_num_requests_waiting"] == 1)
                    asked = time.perf_counter()  # the step loop is busy: health still answers at once
                    assert httpx.get(f"{url}/health").status_code == 200 and time.perf_counter() - asked < 1.0
                    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "y", "max_tokens": 2})
                    assert refused.status_code == 429
                    assert refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                    with pytest.raises(openai.RateLimitError):
                        client(url).completions.create(model=model_name(url), prompt="z", max_tokens=2)
        assert wait_for(lambda: metrics(url)["gss_num_requests_running"] == 0)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200


BAD = [  # (body, the param the error names)
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": [1, 256]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "a" * 5000}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 33}, "n"),
    ({"prompt": "a", "n": 2, "best_of": 1}, "best_of"),
    ({"prompt": "a", "n": 2, "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "stop_token_ids": [999]}, "stop_token_ids"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "", "max_tokens": 2}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "logprobs": -1}, "logprobs"),
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "max_token": 3}, "max_token"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
]


def test_bad_requests_answer_400_and_the_server_keeps_serving(servers):
    url = servers["dsconv"]
    for body, param in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param, (body, error)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).completions.create(model=model_name(url), prompt="a", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="another-model", prompt="a", max_tokens=1)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
    assert metrics(url)['gss_request_rejected_total{status=400}'] >= len(BAD)


def test_a_client_that_disconnects_frees_its_slot(servers):
    """Mid-stream, and while waiting for a whole (non-streamed) answer."""
    url = servers["gss"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 100000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metrics(url)["gss_num_requests_running"] == 1
    assert wait_for(lambda: metrics(url)["gss_num_requests_running"] == 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 100000}, timeout=1.0)
    assert wait_for(lambda: metrics(url)["gss_num_requests_running"] == 0)
    assert metrics(url)['gss_request_success_total{finished_reason=abort}'] >= 2


def test_metrics_parse_as_prometheus(servers):
    url = servers["mhesa"]
    httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0})
    seen = metrics(url)
    assert seen["gss_time_to_first_token_seconds_count"] >= 1
    assert seen["gss_time_per_output_token_seconds_count"] >= 4
    assert seen["gss_generation_tokens_total"] >= 5
    assert seen["gss_num_requests_running"] == 0 and seen["gss_num_requests_waiting"] == 0
    assert seen["gss_request_success_total{finished_reason=length}"] >= 1


def test_models_and_health(servers):
    for family, url in servers.items():
        (card,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert card["family"] == family and card["object"] == "model"
        assert card["context"] == ("bounded" if family == "dsconv" else "unbounded")
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_a_list_of_prompts_and_stop_strings(servers, folders):
    """Several prompts in one request: one choice each, in order, each its solo run, streamed or not;
    a stop string ends a choice with "stop" and is not returned, also when it spans two tokens."""
    url = servers["dsconv"]
    api, name = client(url), model_name(url)
    prompts = ["The for statement", "A list is", "x"]
    want = [solo(folders["dsconv"], list(p.encode()), 12) for p in prompts]
    whole = api.completions.create(model=name, prompt=prompts, max_tokens=12, temperature=0, user="tests")
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.token_ids for c in whole.choices] == want
    assert whole.usage.prompt_tokens == sum(len(p) for p in prompts) and whole.usage.completion_tokens == 36
    pieces = {0: [], 1: [], 2: []}
    for chunk in api.completions.create(model=name, prompt=prompts, max_tokens=12, temperature=0, stream=True):
        pieces[chunk.choices[0].index] += chunk.choices[0].token_ids
    assert [pieces[i] for i in range(3)] == want
    text = bytes(want[0]).decode()
    stop = text[3:5]  # two bytes: the first is held back until the second decides
    cut = api.completions.create(model=name, prompt=prompts[0], max_tokens=12, temperature=0, stop=[stop, "unseen"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=name, prompt=prompts[0], max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text
