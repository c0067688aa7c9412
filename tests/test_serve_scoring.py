"""gss-serve's scoring: log-probabilities (generated and echoed prompts) equal upstream eager's log-softmax,
streamed and whole answers agree exactly, n samples share one prefill and equal their solo runs, best_of
picks by cumulative log-probability, and the tokenizer endpoints. Live servers, the openai client and httpx."""
from __future__ import annotations

import codecs
import json
from contextlib import ExitStack

import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import LANG_PROMPT, LONG_PROMPT, family_upstream
from serve_support import live_server

from gss_export.tolerances import TOLERANCES

FAMILIES = ("dsconv", "gss")
TEXT = "The for statement is used to iterate over the elements of a sequence"


@pytest.fixture(scope="module")
def servers(example_onnx, family_exports):
    with ExitStack() as stack:
        yield {"dsconv": stack.enter_context(live_server(example_onnx, "--threads", "1")),
               "gss": stack.enter_context(live_server(family_exports("gss", "onnx"), "--threads", "1"))}


@pytest.fixture(scope="module")
def eager(example_upstream):
    """family -> ids -> eager log-softmax after every position, (n, 256) float64."""
    models = {"dsconv": example_upstream, "gss": family_upstream("gss")}

    def run(family, ids):
        with torch.no_grad():
            logits = models[family](torch.tensor([list(ids)]))[0].double()
        return torch.log_softmax(logits, -1).numpy()

    return run


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, **body) -> dict:
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def streamed(url: str, **body) -> dict[int, dict]:
    """choice index -> its chunks joined: text, token_ids and each logprobs list concatenated."""
    out: dict[int, dict] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                joined = out.setdefault(c["index"], {"text": "", "token_ids": [], "logprobs": None, "finish_reason": None})
                joined["text"] += c["text"]
                joined["token_ids"] += c["token_ids"]
                joined["finish_reason"] = c["finish_reason"] or joined["finish_reason"]
                if c["logprobs"] is not None:
                    lp = joined["logprobs"] = joined["logprobs"] or {k: [] for k in c["logprobs"]}
                    for k, v in c["logprobs"].items():
                        lp[k] += v
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [LANG_PROMPT, LONG_PROMPT], ids=["step-graph", "prefill-graph"])
def test_echo_scores_the_prompt_as_eager_does(servers, eager, family, prompt):
    """echo + max_tokens 0: the prompt alone, each token scored by the logits before it, first one null."""
    reply = post(servers[family], prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    (choice,) = reply["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == bytes(prompt).decode() and choice["token_ids"] == [] and choice["finish_reason"] == "length"
    assert lp["tokens"] == [chr(t) for t in prompt] and lp["text_offset"] == list(range(len(prompt)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = eager(family, prompt)
    got = np.array(lp["token_logprobs"][1:])
    expected = want[np.arange(len(prompt) - 1), prompt[1:]]
    error = np.abs(got - expected).max()
    print(f"\n{family}, {len(prompt)}-token prompt: max |logprob - eager| {error:.2e}")
    assert error <= TOLERANCES["logprob"].atol
    for i, top in enumerate(lp["top_logprobs"][1:]):
        best = np.argsort(-want[i], kind="stable")[:5]
        assert set(top) >= {chr(t) if t < 128 else f"bytes:\\x{t:02x}" for t in best[:4]}  # the 5th may tie-swap
        assert len(top) in (5, 6) and top[lp["tokens"][i + 1]] == lp["token_logprobs"][i + 1]
        assert list(top.values())[:5] == sorted(list(top.values())[:5], reverse=True)
    # an echoed prompt is always computed whole: it needs every position's logits
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt),
                              "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_logprobs_are_eagers_and_lm_eval_gets_one_entry_per_token(servers, eager, family):
    url = servers[family]
    done = post(url, prompt=TEXT, max_tokens=12, temperature=0, logprobs=3)
    (choice,) = done["choices"]
    ids, lp = choice["token_ids"], choice["logprobs"]
    want = eager(family, list(TEXT.encode()) + ids)[len(TEXT) - 1 : -1]
    assert len(lp["token_logprobs"]) == len(ids) == 12
    assert np.abs(np.array(lp["token_logprobs"]) - want[np.arange(12), ids]).max() <= TOLERANCES["logprob"].atol
    # greedy: the chosen token is the most likely, and its value is exactly the top list's best (lm-eval's is_greedy)
    assert all(v == max(top.values()) for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]))
    # a token's offset: the characters complete before it (a random model's bytes need not be UTF-8)
    decoder, offsets, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], ""
    for t in ids:
        offsets.append(len(text))
        text += decoder.decode(bytes([t]))
    assert lp["text_offset"] == offsets and choice["text"] == text + decoder.decode(b"", final=True)
    # lm-eval's loglikelihood request: ids, echo, one new token: an entry per prompt token plus the generated one
    ids_prompt = list(TEXT.encode())
    scored = post(url, prompt=ids_prompt, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234)["choices"][0]
    assert len(scored["logprobs"]["token_logprobs"]) == len(ids_prompt) + 1
    assert scored["text"] == TEXT + bytes(scored["token_ids"]).decode("utf-8", "replace")
    continuation = sum(scored["logprobs"]["token_logprobs"][10:-1])
    expected = eager(family, ids_prompt)[np.arange(9, len(ids_prompt) - 1), ids_prompt[10:]].sum()
    assert abs(continuation - expected) <= TOLERANCES["loglikelihood"].atol


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_and_whole_logprobs_agree_exactly(servers, family):
    url = servers[family]
    body = dict(prompt=["naïve café: ", bytes(LANG_PROMPT).decode()], max_tokens=10, temperature=0.9, seed=3, logprobs=2, echo=True,
                stop=["e"])
    whole = post(url, **body)["choices"]
    pieces = streamed(url, **body)
    for choice in whole:
        assert pieces[choice["index"]] == {k: choice[k] for k in ("text", "token_ids", "logprobs", "finish_reason")}
        lp = choice["logprobs"]
        # every shown token has an entry; a byte that is not a character alone is written bytes:\xNN
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(lp["token_logprobs"])
        assert "bytes:\\xc3" in lp["tokens"] or choice["index"] == 1
    first = whole[0]["logprobs"]  # offsets count characters: ï (2 bytes) starts at 2, and so does its second byte
    assert first["tokens"][2:5] == ["bytes:\\xc3", "bytes:\\xaf", "v"]
    assert first["text_offset"][2:5] == [2, 2, 3]


def test_n_samples_share_a_prefill_and_equal_their_solo_runs(servers):
    url = servers["dsconv"]
    body = dict(prompt=TEXT, max_tokens=10, temperature=1.0, seed=41)
    many = api(url).completions.create(model=api(url).models.list().data[0].id, n=4, **body)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for c in many.choices:
        alone = post(url, **{**body, "seed": 41 + c.index})["choices"][0]
        assert c.token_ids == alone["token_ids"] and c.text == alone["text"]
    assert many.usage.prompt_tokens == len(TEXT)  # the prompt counts once
    assert len({tuple(c.token_ids) for c in many.choices}) > 1
    # two prompts x 2 samples: prompt-major indices, each prompt's samples seeded seed + j
    two = post(url, prompt=[TEXT, "A list is"], n=2, **{k: v for k, v in body.items() if k != "prompt"})
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][3]["token_ids"] == post(url, **{**body, "prompt": "A list is", "seed": 42})["choices"][0]["token_ids"]
    # streamed n: each choice's chunks make its whole answer
    assert {i: c["token_ids"] for i, c in streamed(url, n=3, **body).items()} == {
        c.index: c.token_ids for c in many.choices[:3]}


def test_best_of_returns_the_most_likely_samples(servers):
    url = servers["gss"]
    body = dict(prompt=TEXT, max_tokens=8, temperature=1.2, seed=5)
    solo = [post(url, **{**body, "seed": 5 + j}, logprobs=0)["choices"][0] for j in range(4)]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in solo]
    best = post(url, **body, n=2, best_of=4)
    ranked = sorted(range(4), key=lambda j: -totals[j])[:2]
    assert [c["token_ids"] for c in best["choices"]] == [solo[j]["token_ids"] for j in ranked]
    assert [c["index"] for c in best["choices"]] == [0, 1] and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 4 * 8  # every sample drawn is counted


def test_tokenizer_endpoints(servers):
    url = servers["dsconv"]
    text = "naïve = 1"
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tokens == {"count": len(text.encode()), "max_model_len": 2048, "tokens": list(text.encode())}
    strs = httpx.post(f"{url}/tokenize", json={"prompt": "ï", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["bytes:\\xc3", "bytes:\\xaf"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": list(text.encode())}).json() == {"prompt": text}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] is None and info["vocab_size"] == 256 and "utf-8" in info["text_to_ids"]
    for path, body, param in (("/detokenize", {"tokens": [256]}, "tokens"), ("/tokenize", {"prompt": 3}, "prompt"),
                              ("/tokenize", {"text": "x"}, "prompt")):
        refused = httpx.post(f"{url}{path}", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
