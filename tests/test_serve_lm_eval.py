"""EleutherAI's lm-evaluation-harness, run as a user runs it, against a live gss-serve.

`python -m lm_eval run --model local-completions` with the default `tokenizer_backend=auto`: it finds
the server's vLLM tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize) by itself, scores
multiple-choice answers through `echo` + `logprobs` and generates through `stop`. Small tasks on local
data (multiple choice, generate_until, and a perplexity task), for the bundled example (GatedDsConvLM)
and a small GatedStateSpacesLM; everything lm-eval logged is checked against upstream's eager model:
each loglikelihood (within 1e-3) and its is_greedy, the accuracy, and every generation (greedy, full
recompute, cut at the stop string).

Perplexity (loglikelihood_rolling) scores a text after lm-eval's prefix token, the tokenizer's BOS or
EOS; a byte-level model has neither (/tokenizer_info says null), so lm-eval would send a null id and
the server refuses the prompt: the run passes `custom_prefix_token_id=10` ("\n", what separates the
documents the example was trained on), as a user of this server must.

Offline: the harness runs with the Hugging Face offline switches and a fresh HF_HOME, and a guard
refuses (and records) any connection or name lookup beyond loopback.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import eager_greedy, family_upstream, require
from serve_support import live_server

FAMILIES = ("dsconv", "gss")
LL_ATOL = 1e-3
GEN_TOKENS = 20  # max_gen_toks of the generate_until task
NEAR_TIE = 1e-4  # is_greedy is compared only where eager's top two differ by more than this

# (context, choices, gold): sentences of the Python documentation the example was trained on. lm-eval scores
# context + " " + choice; one context is longer than 128 bytes (the example's prompts go through prefill.onnx
# above that), some bytes are not ASCII, and " container" is the example's own greedy continuation of the first.
CHOICE_DOCS = [
    ('The "for" statement is used to iterate over the elements of a', ["sequence", "container", "function", "module"], 0),
    ('The "if" statement is used for conditional', ["execution", "import", "keyword"], 0),
    ('The "while" statement is used for repeated execution as long as an expression is',
     ["true", "false", "imported", "“true”"], 0),
    ('"pass" is a null operation — when it is executed, nothing', ["happens", "is returned", "is raised"], 0),
    ('"return" may only occur syntactically nested in a function', ["definition", "call", "module", "string"], 0),
    ("Lambda expressions (sometimes called lambda forms) are used to create",
     ["anonymous functions", "new classes", "byte strings"], 0),
    ("Deletion of a target list recursively deletes each target, from left to", ["right", "bottom", "the module"], 0),
    ('The "try" statement specifies exception handlers and/or cleanup code\nfor a group of statements. When an '
     'exception occurs in the "try" clause, a search for an exception handler is', ["started", "finished", "compiled"], 0),
    ("Classes are callable.  These objects normally act as factories for new instances of",
     ["themselves", "integers", "modules"], 0),
    ('If the syntax "*expression" appears in the function call, "expression" must evaluate to an',
     ["iterable", "integer", "exception"], 0),
]
# contexts to continue greedily up to the first newline: for the example, the first breaks its line mid-way
# and the fifth at once (an empty generation); three are longer than 128 bytes; one has an em dash
GEN_CONTEXTS = [
    'The "for" statement is used to iterate over the elements of a sequence\n(such as a string, tuple or list) or other',
    "This repeatedly tests the expression and, if it is true, executes the\nfirst suite; if the expression is "
    "false (which may be the first",
    'If an expression list is present, it is evaluated, else "None" is\nsubstituted.\n\n"return" leaves the current '
    "function call with the",
    "Lambda expressions (sometimes called lambda forms) are used to create\nanonymous functions. The expression "
    '"lambda parameters: expression"\nyields a',
    'A "break" statement executed in the first suite terminates the loop',
    '"pass" is a null operation — when it is executed, nothing happens. It\nis useful as a',
    'Note: The "__bool__()" method should return',
    "Changed in version 3.11: ",
]
# texts for the perplexity task, each scored whole after the prefix token (one window: all are short)
ROLLING_TEXTS = [
    'The "pass" statement is a null operation.',
    '"pass" is a null operation — when it is executed, nothing happens.',
    'The "for" statement is used to iterate over the elements of a sequence\n(such as a string, tuple or list) or '
    "other iterable object. The starred list expression is evaluated once.",
]
PREFIX_TOKEN = 10  # custom_prefix_token_id: "\n"

CHOICE_TASK = """\
task: gss_serve_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """\
task: gss_serve_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TASK = """\
task: gss_serve_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
TASKS = ("gss_serve_choice", "gss_serve_until", "gss_serve_rolling")

# sitecustomize for the harness's interpreter: any name lookup or connection beyond loopback is refused and
# written to $GSS_TEST_NETWORK_LOG, so the test knows the harness reached for nothing outside this machine
NETWORK_GUARD = '''
import os, socket

_LOG = os.environ["GSS_TEST_NETWORK_LOG"]
_LOCAL = {None, "", "127.0.0.1", "::1", "localhost", b"127.0.0.1", b"::1", b"localhost"}


def _refuse(what):
    with open(_LOG, "a") as f:
        f.write(what + "\\n")
    raise OSError(f"network access blocked by the test: {what}")


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL:
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def _guarded(method):
    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            _refuse(f"{method.__name__} {address!r}")
        return method(self, address)
    return guarded


socket.getaddrinfo = getaddrinfo
socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
'''


@dataclass
class Evaluation:
    family: str
    model: torch.nn.Module  # upstream eager, the reference
    choice: list[dict]  # lm-eval's logged samples, by doc_id
    until: list[dict]
    rolling: list[dict]
    results: dict  # results_*.json's "results"
    log: str  # the harness's stdout and stderr
    network: str  # what the guard refused


def _write_tasks(folder: Path) -> None:
    folder.mkdir()
    with open(folder / "choice.jsonl", "w", encoding="utf-8") as f:
        for context, choices, gold in CHOICE_DOCS:
            f.write(json.dumps({"context": context, "choices": choices, "gold": gold}) + "\n")
    with open(folder / "until.jsonl", "w", encoding="utf-8") as f:
        for context in GEN_CONTEXTS:
            f.write(json.dumps({"context": context, "answer": " is executed."}) + "\n")
    with open(folder / "rolling.jsonl", "w", encoding="utf-8") as f:
        for text in ROLLING_TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    (folder / "rolling.yaml").write_text(ROLLING_TASK.format(data=json.dumps(str(folder / "rolling.jsonl"))))
    (folder / "choice.yaml").write_text(CHOICE_TASK.format(data=json.dumps(str(folder / "choice.jsonl"))))
    (folder / "until.yaml").write_text(GEN_TASK.format(data=json.dumps(str(folder / "until.jsonl")), max_gen_toks=GEN_TOKENS))


def _offline_env(work: Path) -> dict:
    """The harness's environment: Hugging Face offline, a fresh HF_HOME, and the network guard."""
    guard = work / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_TOKEN"))}
    env.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf_home"),  # nothing cached from earlier runs is used
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        LMEVAL_LOG_LEVEL="INFO", GSS_TEST_NETWORK_LOG=str(work / "network.log"),
        PYTHONPATH=os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def _run_harness(url: str, work: Path) -> subprocess.CompletedProcess:
    """`python -m lm_eval run` against the server, offline, in `work`."""
    (card,) = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    model_args = ",".join([f"base_url={url}/v1/completions", f"model={card['id']}", "tokenizer_backend=auto",
                           "num_concurrent=4", "max_retries=1", f"max_length={card['max_model_len']}",
                           f"custom_prefix_token_id={PREFIX_TOKEN}"])
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", ",".join(TASKS), "--include_path", str(work / "tasks"),
               "--log_samples", "--output_path", str(work / "out")]
    return subprocess.run(command, cwd=work, env=_offline_env(work), capture_output=True, text=True, timeout=600)


def _read_samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.fixture(scope="module", params=FAMILIES)
def evaluation(request, tmp_path_factory) -> Evaluation:
    """lm-eval run once per family against its own gss-serve; the server is stopped once the harness is done."""
    family = request.param
    require(importlib.util.find_spec("lm_eval") is not None,
            "lm-eval is not installed (pip install 'lm-eval[api]==0.4.13'; it is in the test extra)")
    if family == "dsconv":
        folder, model = request.getfixturevalue("example_onnx"), request.getfixturevalue("example_upstream")
    else:
        folder, model = request.getfixturevalue("family_exports")(family, "onnx"), family_upstream(family)
    work = tmp_path_factory.mktemp(f"lm_eval_{family}")
    _write_tasks(work / "tasks")
    with live_server(folder, "--max-batch", "8", "--max-queue", "32", "--threads", "1") as url:
        run = _run_harness(url, work)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"lm_eval exited with {run.returncode}:\n{log[-6000:]}"
    (results_file,) = (work / "out").rglob("results_*.json")
    network = work / "network.log"
    return Evaluation(family, model, _read_samples(work / "out", "gss_serve_choice"),
                      _read_samples(work / "out", "gss_serve_until"), _read_samples(work / "out", "gss_serve_rolling"),
                      json.loads(results_file.read_text(encoding="utf-8"))["results"], log,
                      network.read_text() if network.exists() else "")


def _arguments(sample: dict) -> list[tuple]:
    """A logged sample's request arguments, in request order (gen_args_0, gen_args_1, ...)."""
    args = sample["arguments"]
    return [(args[k]["arg_0"], args[k]["arg_1"]) for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))]


def _rolling_text(sample: dict) -> str:
    """A logged loglikelihood_rolling sample's one argument: the text scored."""
    (args,) = sample["arguments"].values()
    return args["arg_0"]


def eager_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool, bool]:
    """(loglikelihood, is_greedy, near_tie) of `continuation` after `context`, as lm-eval defines them, from one
    eager forward pass over the bytes of both. The split is lm-eval's (TemplateLM._encode_pair): trailing
    whitespace of the context moves to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ids = list((context + continuation).encode("utf-8"))
    start = len(context.encode("utf-8"))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    lp = torch.log_softmax(logits.double(), dim=-1)[start - 1 : len(ids) - 1]  # row p scores token p + 1
    targets = torch.tensor(ids[start:])
    chosen = lp.gather(1, targets[:, None])[:, 0]
    others = lp.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    margin = chosen - others  # > 0: the token is the argmax there
    return float(chosen.sum()), bool((margin > 0).all()), bool((margin.abs() < NEAR_TIE).any())


@pytest.fixture(scope="module")
def eager_scores(evaluation) -> list[list[tuple[float, bool, bool]]]:
    """Per logged multiple-choice sample, per choice: eager's (loglikelihood, is_greedy, near_tie)."""
    return [[eager_loglikelihood(evaluation.model, c, x) for c, x in _arguments(s)] for s in evaluation.choice]


def test_lm_eval_detects_the_servers_tokenizer_and_stays_offline(evaluation):
    """tokenizer_backend=auto finds /tokenizer_info and /tokenize and picks the remote backend; nothing was
    retried or refused, and nothing beyond loopback was looked up or connected to."""
    log = evaluation.log
    assert "Auto-detected remote tokenizer support" in log, log[-4000:]
    assert "Using tokenizer remote" in log, log[-4000:]
    assert "API request failed" not in log and "Retry attempt" not in log, log[-4000:]
    assert evaluation.network == "", f"lm-eval reached for the network:\n{evaluation.network}"
    assert len(evaluation.choice) == len(CHOICE_DOCS) and len(evaluation.until) == len(GEN_CONTEXTS)
    # the requests lm-eval made are the documents' own text (byte-level: what /tokenize gave back round-trips)
    for sample, (context, choices, _) in zip(evaluation.choice, CHOICE_DOCS):
        assert _arguments(sample) == [(context, " " + c) for c in choices]


def test_loglikelihoods_equal_eager(evaluation, eager_scores):
    """Every (loglikelihood, is_greedy) lm-eval logged is eager's, the loglikelihood within 1e-3."""
    errors, greedy_checked, greedy_true = [], 0, 0
    for sample, want in zip(evaluation.choice, eager_scores):
        assert sample["filtered_resps"] == [r[0] for r in sample["resps"]]
        got = [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]
        assert len(got) == len(want)
        for (ll, greedy), (eager_ll, eager_is_greedy, near_tie), args in zip(got, want, _arguments(sample)):
            errors.append((abs(ll - eager_ll), sample["doc_id"], args[1], ll, eager_ll))
            if not near_tie:
                greedy_checked += 1
                greedy_true += eager_is_greedy
                assert greedy == eager_is_greedy, (evaluation.family, sample["doc_id"], args, greedy, eager_is_greedy)
    worst = max(errors)
    summary = (f"{evaluation.family}: max |loglikelihood - eager| = {worst[0]:.3g} over {len(errors)} choices "
               f"(doc {worst[1]}, {worst[2]!r}: lm-eval {worst[3]:.6f}, eager {worst[4]:.6f}); is_greedy compared "
               f"on {greedy_checked}, true on {greedy_true}")
    print(summary)
    assert worst[0] <= LL_ATOL, summary


def test_accuracy_equals_eager(evaluation, eager_scores):
    """Per document and overall: lm-eval's acc is eager's argmax against the gold choice."""
    eager_correct = [float(int(np.argmax([s[0] for s in scores])) == gold)
                     for scores, (_, _, gold) in zip(eager_scores, CHOICE_DOCS)]
    got_correct = [s["acc"] for s in evaluation.choice]
    acc = evaluation.results["gss_serve_choice"]["acc,none"]
    summary = f"{evaluation.family}: lm-eval acc {acc:.4f}, eager {np.mean(eager_correct):.4f}"
    print(summary)
    assert got_correct == eager_correct, (summary, got_correct, eager_correct)
    assert acc == pytest.approx(float(np.mean(eager_correct)), abs=1e-12), summary


def test_generations_equal_eager_greedy(evaluation):
    """Every generate_until answer is eager greedy decoding of the context's bytes (GEN_TOKENS tokens,
    full recompute) cut at the first newline, as text."""
    stopped = 0
    for sample, context in zip(evaluation.until, GEN_CONTEXTS):
        (args,) = _arguments(sample)
        assert args[0] == context and args[1]["until"] == ["\n"] and args[1]["max_gen_toks"] == GEN_TOKENS
        tokens = eager_greedy(evaluation.model, list(context.encode("utf-8")), GEN_TOKENS)
        if 10 in tokens:
            tokens, stopped = tokens[: tokens.index(10)], stopped + 1
        want = bytes(tokens).decode("utf-8", errors="replace")
        assert sample["resps"] == [[want]] and sample["filtered_resps"] == [want], (
            evaluation.family, sample["doc_id"], sample["resps"], want)
    print(f"{evaluation.family}: {len(GEN_CONTEXTS)} generations equal eager greedy, {stopped} ended at the stop string")
    if evaluation.family == "dsconv":  # the example's generations reach the stop string mid-way and at once
        assert stopped >= 2


def test_perplexity_loglikelihoods_equal_eager(evaluation):
    """loglikelihood_rolling: each text's loglikelihood after the prefix token is eager's, within 1e-3
    (one eager pass over the prefix and the text's bytes)."""
    errors = []
    for sample, text in zip(evaluation.rolling, ROLLING_TEXTS):
        assert _rolling_text(sample) == text
        ids = [PREFIX_TOKEN, *text.encode("utf-8")]
        with torch.no_grad():
            lp = torch.log_softmax(evaluation.model(torch.tensor([ids]))[0].double(), dim=-1)
        want = float(lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
        (got,) = sample["filtered_resps"]
        errors.append((abs(float(got) - want), sample["doc_id"], float(got), want))
    worst = max(errors)
    summary = (f"{evaluation.family}: max |rolling loglikelihood - eager| = {worst[0]:.3g} over {len(errors)} texts "
               f"(doc {worst[1]}: lm-eval {worst[2]:.6f}, eager {worst[3]:.6f})")
    print(summary)
    assert len(errors) == len(ROLLING_TEXTS) and worst[0] <= LL_ATOL, summary


def test_the_network_guard_refuses_and_records(tmp_path):
    """The guard the harness runs under does refuse a lookup beyond loopback, and records it."""
    probe = "import socket\ntry:\n    socket.create_connection(('example.com', 80), timeout=5)\nexcept OSError as e:\n    print(e)\n"
    run = subprocess.run([sys.executable, "-c", probe], env=_offline_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert "blocked by the test" in run.stdout, run.stdout + run.stderr
    assert "example.com" in (tmp_path / "network.log").read_text()
