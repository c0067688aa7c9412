"""gss-serve's request handling in process: a model whose tokens are not bytes, and fuzzed request
bodies (hypothesis, derandomized and bounded), none of which may get a 500 or stop the server."""
from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import event, given
from hypothesis import strategies as st

from serve_support import wait_for
from tiny import fuzz

VOCAB = 50  # not 256: ids in, ids out


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """A TestClient over gss-serve's app on a tiny GatedDsConvLM of 50 tokens (4 running, 4 waiting)."""
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    from gss_export.checkpoint import load_checkpoint
    from gss_export.export import export_model
    from gss_runtime.serve.app import ModelHost, build_app

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("ids_model")
    checkpoint = folder / "model.pt"
    torch.save(Upstream(num_tokens=VOCAB, dim=16, depth=1, heads=2, dim_dsconv=8, dim_expansion_factor=2).state_dict(), checkpoint)
    export_model(load_checkpoint(checkpoint, max_seq_len=64).model, "onnx", folder / "export", conv="direct", validate=False)
    with TestClient(build_app(ModelHost(folder / "export", threads=1, max_batch=4, max_queue=4, eos_id=7))) as client:
        assert wait_for(lambda: client.get("/health").status_code == 200)
        client.folder = folder / "export"
        yield client


def test_ids_in_ids_out(http):
    from gss_runtime import Generator

    want = Generator(http.folder, provider="cpu", threads=1).generate([1, 2, 3], 10, eos_id=7)
    reply = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 10, "temperature": 0}).json()
    (choice,) = reply["choices"]
    assert choice["token_ids"] == want.tokens[0]
    assert choice["text"] == "".join(f" {t}" for t in want.tokens[0])
    assert choice["finish_reason"] == ("stop" if want.stop_reasons[0] == "eos" else "length")
    ignored = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()
    assert ignored["choices"][0]["finish_reason"] == "length"
    too_many = {"prompt": [[1]] * 9}  # 4 running and 4 waiting at most: never admissible, so 400, not 429
    for body, param in (({"prompt": "text"}, "prompt"), ({"prompt": [1], "stop": "x"}, "stop"), ({"prompt": [50]}, "prompt"),
                        (too_many, "prompt")):
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)


def field(valid, junk=JSON):
    """Mostly a value of the right type (7 in 8), sometimes anything JSON can hold."""
    return st.one_of(*[valid] * 7, junk)


FIELDS = {  # every field optional; each mostly valid, so that many bodies get through to generation
    "max_tokens": field(st.integers(0, 12)), "temperature": field(st.floats(0, 2.2)), "top_p": field(st.floats(0.01, 1.05)),
    "top_k": field(st.integers(-2, 60)), "seed": field(st.integers(-1, 2**64)), "stop_token_ids": field(st.lists(st.integers(-1, 55), max_size=3)),
    "stream": field(st.booleans()), "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()), "n": field(st.just(1) | st.just(1) | st.integers(0, 3)), "user": field(st.text(max_size=5)),
}
JUNK = {"stop": JSON, "model": JSON, "logprobs": JSON, "unknown": JSON}
BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": field(IDS | st.lists(IDS, min_size=1, max_size=3), st.text(max_size=4) | JSON)}, optional=FIELDS),
    st.fixed_dictionaries({}, optional={**FIELDS, **JUNK, "prompt": JSON}),
)


@fuzz(200)
@given(body=BODIES, raw=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=12)))
def test_fuzzed_bodies_get_an_answer_never_a_500(http, body, raw):
    payload = raw if raw is not None else json.dumps(body).encode()
    reply = http.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    assert reply.status_code in (200, 400, 404, 429), (body, reply.status_code, reply.text)
    event(f"status {reply.status_code}")
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert http.get("/health").status_code == 200


def test_a_model_without_text_scores_ids_and_has_no_tokenizer(http):
    """Token strings are vLLM's token_id:N; the tokenizer endpoints say why they cannot answer."""
    reply = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                               "echo": True, "ignore_eos": True}).json()
    lp = reply["choices"][0]["logprobs"]
    assert lp["tokens"][:3] == ["token_id:1", "token_id:2", "token_id:3"] and lp["token_logprobs"][0] is None
    assert all(key.startswith("token_id:") for top in lp["top_logprobs"][1:] for key in top)
    assert lp["text_offset"][:4] == [0, 2, 4, 6]  # " 1 2 3": each id's text is a space and its digits
    for method, path, body in (("post", "/tokenize", {"prompt": "a"}), ("post", "/detokenize", {"tokens": [1]}),
                               ("get", "/tokenizer_info", None)):
        refused = getattr(http, method)(path, **({"json": body} if body else {}))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_text_mapping", refused.text
        assert "token ids only" in refused.json()["error"]["message"] or "no text" in refused.json()["error"]["message"]
