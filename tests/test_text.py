"""Text for any vocabulary: a Hugging Face tokenizer trained here (byte-level BPE with merges, multi-byte
characters, special tokens, a chat template) travels with the export, and gss-run, Generator and gss-serve
(completions and chat, streamed and not) give the text of upstream eager's greedy ids, decoded by the same
tokenizer. Bad tokenizer files and chat requests get one clear error."""
from __future__ import annotations

import json
import subprocess
import sys

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_cli
from text_support import CHAT_TEMPLATE, EOS, PROMPTS, eager_greedy_ids, text_export, tokenizer_folder
from tiny import fuzz

NEW = 24
FAMILIES = ["dsconv", "gss"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_folder(tmp_path_factory) / "tokenizer.json"))


def expected_text(tok, family: str, prompt_ids: list[int]) -> str:
    eos = tok.token_to_id(EOS)
    return tok.decode(eager_greedy_ids(family, prompt_ids, NEW, eos), skip_special_tokens=True)


# ---- the export --------------------------------------------------------------------------------------
def test_the_export_carries_and_records_the_tokenizer(tmp_path_factory):
    out = text_export(tmp_path_factory, "dsconv")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tokenizer_folder(tmp_path_factory) / name).read_bytes()
    record = json.loads((out / "config.json").read_text())["tokenizer"]
    assert record["eos_token"] == EOS and record["eos_token_id"] == 0 and record["chat_template"] is True
    assert record["vocab_size"] == json.loads((out / "config.json").read_text())["model"]["num_tokens"]


def test_bad_tokenizers_get_one_line_errors(tmp_path_factory, tmp_path, monkeypatch, capsys):
    import torch


    from gss_export.families import FAMILIES

    entry = FAMILIES["dsconv"]  # a model of 300 tokens: the 512-token tokenizer does not fit it
    small = entry.upstream(entry.config(num_tokens=300, dim=16, depth=1, heads=2, dim_dsconv=8, dim_expansion_factor=2))
    ckpt = tmp_path / "small.pt"
    torch.save(small.state_dict(), ckpt)
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    (tmp_path / "notjson.json").write_text("{nope")
    cases = [(tokenizer_folder(tmp_path_factory), ["512 tokens", "num_tokens 300"]),
             (tmp_path / "broken.json", ["not a Hugging Face tokenizer.json"]),
             (tmp_path / "notjson.json", ["not a Hugging Face tokenizer.json"]),
             (tmp_path / "missing", ["no tokenizer.json there"])]
    for path, words in cases:
        code, out, err = run_cli(monkeypatch, capsys, str(ckpt), "-o", str(tmp_path / "out"), "--tokenizer", str(path),
                                 "--no-validate")
        message = [line for line in (out + err).splitlines() if line.startswith("error")]
        assert code == 2 and len(message) == 1 and all(w in message[0] for w in words), (out, err)
        assert not (tmp_path / "out").exists()


# ---- the streaming detokenizer -----------------------------------------------------------------------
@fuzz(60)
@given(st.lists(st.integers(0, 511), min_size=1, max_size=40))
def test_streamed_text_equals_the_text_decoded_at_once(tmp_path_factory, ids):
    from gss_runtime.tokenizer import TokenizerVocabulary, read_tokenizer

    vocab = TokenizerVocabulary(read_tokenizer(tokenizer_folder(tmp_path_factory)), 512)
    stream = vocab.stream()
    pieces = [stream.add([t]) for t in ids] + [stream.end()]
    assert "".join(pieces) == vocab.decode(ids)
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in vocab.decode(ids)


def test_stop_strings_are_found_across_pieces_and_held_back_until_they_cannot_be():
    from gss_runtime.vocabulary import StopText

    stops = StopText(["END", "\n\n"])
    assert stops.add("abc E") == ("abc ", False)  # "E" may begin END: held
    assert stops.add("N") == ("", False)
    assert stops.add("Dx") == ("", True)
    stops = StopText(["END"])
    assert stops.add("xE") == ("x", False) and stops.add("Z") == ("EZ", False) and stops.end() == ""


# ---- gss-run and Generator -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_gss_run_and_generator_give_eager_greedy_text(tmp_path_factory, tok, family):
    from gss_runtime.generate import Generator

    out = text_export(tmp_path_factory, family)
    generator = Generator(out, provider="cpu")
    assert generator.eos_id == tok.token_to_id(EOS)
    for prompt in PROMPTS:
        want = expected_text(tok, family, tok.encode(prompt).ids)
        result = generator.generate_text(prompt, NEW)
        assert result.text == want, prompt
        assert "".join(generator.stream_text(prompt, NEW)) == want
        assert generator.generate([prompt], NEW).texts == [want]
    proc = subprocess.run([sys.executable, "-m", "gss_runtime.cli", str(out), "--prompt", PROMPTS[1],
                           "--max-new-tokens", str(NEW), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == expected_text(tok, family, tok.encode(PROMPTS[1]).ids)
    streamed = subprocess.run([sys.executable, "-m", "gss_runtime.cli", str(out), "--prompt", PROMPTS[1],
                               "--max-new-tokens", str(NEW)], capture_output=True, text=True, timeout=120)
    assert streamed.stdout == PROMPTS[1] + json.loads(proc.stdout)["text"] + "\n"


def test_a_stop_string_ends_the_text_before_it(tmp_path_factory, tok):
    from gss_runtime.generate import Generator

    generator = Generator(text_export(tmp_path_factory, "dsconv"), provider="cpu")
    whole = generator.generate_text(PROMPTS[0], NEW).text
    stop = whole[5:8]  # a string inside the text, wherever its tokens begin
    result = generator.generate_text(PROMPTS[0], NEW, stop=[stop])
    assert result.text == whole[: whole.index(stop)] and result.stop_reason == "stop_sequence"


# ---- gss-serve --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve_support import live_server

    with live_server(text_export(tmp_path_factory, "gss")) as url:
        yield url


def render(messages, generation=True) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=generation, eos_token=EOS)


def test_completions_and_chat_give_eager_greedy_text_streamed_or_not(server, tok):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="none")
    for prompt in PROMPTS[:3]:
        want = expected_text(tok, "gss", tok.encode(prompt).ids)
        whole = client.completions.create(model=None, prompt=prompt, max_tokens=NEW, temperature=0)
        assert whole.choices[0].text == want
        chunks = client.completions.create(model=None, prompt=prompt, max_tokens=NEW, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == want
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est le café? 日本"}]
    want = expected_text(tok, "gss", tok.encode(render(messages), add_special_tokens=False).ids)
    reply = client.chat.completions.create(model=None, messages=messages, max_tokens=NEW, temperature=0, logprobs=True,
                                           top_logprobs=3)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == len(tok.encode(render(messages), add_special_tokens=False).ids)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    chunks = list(client.chat.completions.create(model=None, messages=messages, max_tokens=NEW, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_stop_strings_and_tokenizer_endpoints_use_the_tokenizer(server, tok):
    import httpx

    whole = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0}).json()
    text = whole["choices"][0]["text"]
    stop = text[4:7]
    for stream in (False, True):
        body = {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0, "stop": [stop], "stream": stream}
        answer = httpx.post(f"{server}/v1/completions", json=body)
        if stream:
            events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
            got, reason = "".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]["finish_reason"]
        else:
            got, reason = answer.json()["choices"][0]["text"], answer.json()["choices"][0]["finish_reason"]
        assert (got, reason) == (text[: text.index(stop)], "stop")
    ids = httpx.post(f"{server}/tokenize", json={"prompt": PROMPTS[1], "return_token_strs": True}).json()
    assert ids["tokens"] == tok.encode(PROMPTS[1]).ids and ids["token_strs"] == tok.encode(PROMPTS[1]).tokens
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == PROMPTS[1]
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == EOS and info["eos_token_id"] == 0 and info["vocab_size"] == 512
    assert info["chat_template"] == CHAT_TEMPLATE


def test_chat_without_a_template_is_a_400_that_says_why(tmp_path_factory, example_onnx):
    import httpx

    from serve_support import live_server

    with live_server(example_onnx) as url:  # byte-level: no tokenizer at all
        answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "no_chat_template"
    assert "no tokenizer" in answer.json()["error"]["message"]
