"""The torch-free runner (gss_runtime): parity with eager PyTorch, no torch import, clear errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from conftest import run_without_torch
from gss_export.export import export_model
from gss_export.families import GatedDsConvLM, DsConvConfig
from gss_runtime import GSSRunner, RuntimeInputError
from gss_runtime.cli import main

CONFIG = DsConvConfig(num_tokens=256, dim=32, depth=2, heads=4, dim_dsconv=16, max_seq_len=64)
RTOL = 1e-4  # of max |logit|, as in test_export_parity
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _identity_model() -> onnx.ModelProto:
    """A one-node x -> y model: a valid ONNX file that is not a GatedDsConvLM (and a cheap CUDA probe)."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", io[:1], io[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even without a GPU and then falls back to CPU: ask a real session."""
    if CUDA not in ort.get_available_providers():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(_identity_model().SerializeToString(), options, providers=[CUDA, CPU])
    return CUDA in session.get_providers()


CUDA_USABLE = _cuda_usable()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager model, folder with model.onnx + config.json)."""
    torch.manual_seed(0)
    model = GatedDsConvLM(CONFIG).eval()
    folder = tmp_path_factory.mktemp("gss_onnx")
    export_model(model, "onnx", folder, validate=False)
    return model, folder


@pytest.fixture(scope="module")
def runner(exported) -> GSSRunner:
    return GSSRunner(exported[1], provider="cpu")


def eager(model: GatedDsConvLM, ids) -> np.ndarray:
    """ids (seq,) or (batch, seq) -> float32 (batch, seq, num_tokens) from the eager model."""
    with torch.no_grad():
        return model(torch.from_numpy(np.atleast_2d(np.asarray(ids, dtype=np.int64)))).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    rel = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    assert rel <= RTOL, f"max error {rel:.2e} of max |logit| > {RTOL}"


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.num_tokens, size=(batch, length), dtype=np.int64)


# -- values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 7), (2, 33), (3, 64)])
def test_logits_match_eager(exported, runner, batch, length):
    ids = random_ids(batch, length, seed=length)
    assert_close(runner.logits(ids), eager(exported[0], ids))


def test_one_sequence_lists_and_other_int_dtypes(exported, runner):
    ids = [72, 105, 33, 0, 255]
    want = eager(exported[0], ids)
    assert_close(runner.logits(ids), want)  # 1-D list -> (1, seq, num_tokens)
    for dtype in (np.uint8, np.int32, np.uint64):
        assert_close(runner.logits(np.array(ids, dtype=dtype)), want)


def test_folder_and_file_and_metadata_config(exported, tmp_path):
    model, folder = exported
    expected = CONFIG.to_dict()
    ids = random_ids(2, 10)
    lone = tmp_path / "lone" / "renamed.onnx"  # no config.json anywhere near: config from the metadata
    lone.parent.mkdir()
    shutil.copy(folder / "model.onnx", lone)
    bare = tmp_path / "bare"  # a folder with model.onnx only
    bare.mkdir()
    shutil.copy(folder / "model.onnx", bare / "model.onnx")
    for path in (folder, str(folder), folder / "model.onnx", lone, bare):
        r = GSSRunner(path, provider="cpu")
        assert r.config == expected, path
        assert r.providers == [CPU]
        assert r.path.suffix == ".onnx"
        assert_close(r.logits(ids), eager(model, ids))


def test_next_token_distribution(exported, runner):
    ids = [104, 101, 108, 108, 111]
    last = eager(exported[0], ids)[0, -1].astype(np.float64)
    want = np.exp(last - last.max())
    want /= want.sum()
    top = runner.next_token_distribution(ids, top=5)
    assert len(top) == 5 and all(isinstance(i, int) and isinstance(p, float) for i, p in top)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    for token, prob in top:
        assert prob == pytest.approx(want[token], abs=1e-5)
    assert probs[-1] >= np.sort(want)[-5] - 1e-5  # the top of the eager distribution
    everything = runner.next_token_distribution(ids, top=10_000)  # clipped to num_tokens
    assert len(everything) == CONFIG.num_tokens
    assert sum(p for _, p in everything) == pytest.approx(1.0, abs=1e-9)


# -- torch must stay out ----------------------------------------------------------------------------------

def test_runs_without_torch(exported, tmp_path):
    model, folder = exported
    ids = random_ids(2, 12, seed=3)
    saved = tmp_path / "logits.npy"
    script = textwrap.dedent(f"""
        import numpy as np
        from gss_runtime import GSSRunner
        runner = GSSRunner({str(folder)!r})
        np.save({str(saved)!r}, runner.logits(np.array({ids.tolist()!r})))
        from gss_runtime.cli import main
        sys.argv = ["gss-run", {str(folder)!r}, "--prompt-ids", "5,6,7", "--next", "3", "--json"]
        main()
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "gss_export"))
        assert not leaked, leaked
    """)
    done = run_without_torch(script)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_close(np.load(saved), eager(model, ids))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prompt_ids"] == [5, 6, 7] and result["provider"] in (CPU, CUDA) and result["seconds"] >= 0
    last = eager(model, [5, 6, 7])[0, -1].astype(np.float64)
    want = np.exp(last - last.max()) / np.exp(last - last.max()).sum()
    assert len(result["next"]) == 3
    for entry in result["next"]:
        assert entry["prob"] == pytest.approx(want[entry["id"]], abs=1e-5)
        assert entry["text"] == repr(bytes([entry["id"]]))[2:-1]


# -- bad input, runner ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids,words", [
    ([], ["empty"]),
    (np.zeros((0, 4), np.int64), ["empty"]),
    (np.zeros((2, 0), np.int64), ["empty"]),
    ([1.0, 2.0], ["integer", "float64"]),
    ([True, False], ["integer", "bool"]),
    (["a"], ["integer"]),
    (7, ["1-D", "2-D"]),
    (np.zeros((1, 2, 3), np.int64), ["1-D", "2-D", "(1, 2, 3)"]),
    ([[1, 2], [3]], ["rectangular"]),
    ([1, 256, 3], ["256", "position 1", "out of range"]),
    ([[1, 2], [3, -1]], ["-1", "position (1, 1)", "out of range"]),
    (list(range(65)), ["65", "too long", "max_seq_len", "64"]),
])
def test_bad_ids(runner, ids, words):
    with pytest.raises(RuntimeInputError) as err:
        runner.logits(ids)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_next_token_arguments(runner):
    with pytest.raises(RuntimeInputError, match="one sequence"):
        runner.next_token_distribution([[1, 2]], top=3)
    with pytest.raises(RuntimeInputError, match="top"):
        runner.next_token_distribution([1, 2], top=0)


def test_bad_model_paths(exported, tmp_path):
    folder = exported[1]
    cases = []
    cases.append((tmp_path / "missing", ["does not exist"]))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", ["no model.onnx", "nothing", "gss-export"]))
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts" / "model.pt").write_bytes(b"x")
    cases.append((tmp_path / "ts", ["no model.onnx", "model.pt", "TorchScript", "gss-export"]))
    (tmp_path / "junk.onnx").write_text("not a model")
    cases.append((tmp_path / "junk.onnx", ["not a loadable ONNX model"]))
    onnx.save(_identity_model(), str(tmp_path / "identity.onnx"))
    cases.append((tmp_path / "identity.onnx", ["input_ids", "logits"]))
    proto = onnx.load(str(folder / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "nometa.onnx"))
    cases.append((tmp_path / "nometa.onnx", ["gss_export.model", "config.json"]))
    (tmp_path / "badcfg").mkdir()
    shutil.copy(folder / "model.onnx", tmp_path / "badcfg" / "model.onnx")
    (tmp_path / "badcfg" / "config.json").write_text('{"model": {"num_tokens": 256}}')
    cases.append((tmp_path / "badcfg", ["config.json", "lacks", "max_seq_len"]))
    for path, words in cases:
        with pytest.raises(RuntimeInputError) as err:
            GSSRunner(path, provider="cpu")
        assert all(w in str(err.value) for w in words), (path, str(err.value))


def test_bad_provider_and_threads(exported):
    with pytest.raises(RuntimeInputError, match="unknown provider 'gpu'"):
        GSSRunner(exported[1], provider="gpu")
    with pytest.raises(RuntimeInputError, match="threads"):
        GSSRunner(exported[1], threads=0)
    assert GSSRunner(exported[1], provider="cpu", threads=1).logits([1, 2]).shape == (1, 2, 256)


# -- providers --------------------------------------------------------------------------------------------


def test_auto_provider_is_quiet(exported, capfd):
    r = GSSRunner(exported[1])  # "auto"
    assert r.providers[0] == (CUDA if CUDA_USABLE else CPU)
    assert "CUDA" not in capfd.readouterr().err  # the fallback probe's log is swallowed


def test_cuda_provider_works_or_says_why(exported):
    model, folder = exported
    if CUDA_USABLE:
        ids = random_ids(2, 20)
        assert_close(GSSRunner(folder, provider="cuda").logits(ids), eager(model, ids))
    else:  # never a silent fallback to CPU
        with pytest.raises(RuntimeInputError, match="CUDA") as err:
            GSSRunner(folder, provider="cuda")
        assert "cpu" in str(err.value)


@pytest.mark.skipif(not CUDA_USABLE, reason="CUDA is not usable by onnxruntime here (no GPU or CUDA/cuDNN libraries)")
def test_cuda_parity(exported):
    model, folder = exported
    r = GSSRunner(folder, provider="cuda")
    assert r.providers[0] == CUDA
    for batch, length in [(1, 1), (3, 64)]:
        ids = random_ids(batch, length)
        assert_close(r.logits(ids), eager(model, ids))


# -- CLI --------------------------------------------------------------------------------------------------


def gss_run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gss-run ARGS`, in-process."""
    monkeypatch.setattr(sys, "argv", ["gss-run", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_table(exported, monkeypatch, capsys, runner):
    code, out, err = gss_run(monkeypatch, capsys, exported[1], "--prompt", "a[b]\n", "--next", "4", "--provider", "cpu")
    assert code == 0, err
    for word in ("rank", "token id", "probability", "byte", CPU):
        assert word in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    expected = runner.next_token_distribution(list("a[b]\n".encode()), top=4)
    assert len(rows) == len(expected) == 4
    for rank, ((token, prob), row) in enumerate(zip(expected, rows), 1):
        cells = [c.strip() for c in row.strip("│").split("│")]
        # "[" and "]" bytes must show as text, not vanish as rich markup
        assert cells == [str(rank), str(token), f"{prob:.4f}", f"'{repr(bytes([token]))[2:-1]}'"]


def test_cli_json(exported, monkeypatch, capsys, runner):
    code, out, err = gss_run(monkeypatch, capsys, exported[1] / "model.onnx", "--prompt-ids", "0,10,255", "--json", "--next", "2")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"prompt_ids", "next", "provider", "seconds"}
    assert result["prompt_ids"] == [0, 10, 255]
    want = runner.next_token_distribution([0, 10, 255], 2)
    assert [e["id"] for e in result["next"]] == [i for i, _ in want]
    assert [e["prob"] for e in result["next"]] == pytest.approx([p for _, p in want])


def test_byte_text(capsys):
    from gss_runtime.cli import _print_table, byte_text

    assert [byte_text(b) for b in (65, 32, 10, 0, 92, 200)] == ["A", " ", "\\n", "\\x00", "\\\\", "\\xc8"]
    _print_table([(91, 0.5), (93, 0.25)], ("byte", lambda t: f"'{byte_text(t)}'"), "t")  # "[" and "]" are rich markup if passed as str
    out = capsys.readouterr().out
    assert "'['" in out and "']'" in out


@pytest.mark.parametrize("args,words", [
    (["--prompt", "hi", "--prompt-ids", "1"], ["exactly one", "--prompt"]),
    ([], ["exactly one", "--prompt-ids"]),
    (["--prompt-ids", "1,x"], ["comma-separated integers", "1,x"]),
    (["--prompt-ids", "1,999"], ["999", "out of range"]),
    (["--prompt-ids", "-3"], ["-3", "out of range"]),
    (["--prompt", ""], ["empty"]),
    (["--prompt-ids", " , "], ["empty"]),
    (["--prompt", "x" * 65], ["too long", "max_seq_len"]),
    (["--prompt", "hi", "--provider", "gpu"], ["--provider", "gpu"]),
    (["--prompt", "hi", "--next", "0"], ["--next"]),
])
def test_cli_bad_input(exported, monkeypatch, capsys, args, words):
    code, out, err = gss_run(monkeypatch, capsys, exported[1], *args)
    assert code == 2, (code, out, err)
    assert all(w in err for w in words), err
    assert "Traceback" not in err and out == ""


def test_cli_bad_model_and_cuda(exported, monkeypatch, capsys, tmp_path):
    code, _, err = gss_run(monkeypatch, capsys, tmp_path / "nowhere", "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    code, _, err = gss_run(monkeypatch, capsys, tmp_path, "--prompt", "hi")
    assert code == 2 and "no decoder.onnx" in err
    code, _, err = gss_run(monkeypatch, capsys, tmp_path, "--prompt", "hi", "--next", "3")
    assert code == 2 and "no model.onnx" in err
    if not CUDA_USABLE:
        code, _, err = gss_run(monkeypatch, capsys, exported[1], "--prompt", "hi", "--provider", "cuda")
        assert code == 2 and "CUDA" in err and "Traceback" not in err


def test_cli_process_exit_code(tmp_path):
    """A real process: the message on stderr, exit 2, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "gss_runtime.cli", str(tmp_path / "nowhere"), "--prompt", "hi"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


# -- generation from the command line -------------------------------------------------------------------


def test_cli_generates_json_like_the_library(exported, monkeypatch, capsys):
    from gss_runtime.generate import Generator, Sampling

    folder = exported[1]
    args = ["--prompt-ids", "5,6,7", "--max-new-tokens", "9", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--json"]
    code, out, err = gss_run(monkeypatch, capsys, folder, *args)
    assert code == 0, err
    result = json.loads(out)
    want = Generator(folder, provider="cpu").generate([5, 6, 7], 9, sampling=Sampling(temperature=0.7, top_p=0.9), seed=3)
    assert result["tokens"] == want.tokens[0] and len(result["tokens"]) == 9
    assert result["stop_reason"] == "max_new_tokens" and result["timings"]["tokens_per_second"] > 0
    assert result["text"] == bytes(want.tokens[0]).decode("utf-8", errors="replace")


def test_cli_streams_text(exported, monkeypatch, capsys):
    code, out, err = gss_run(monkeypatch, capsys, exported[1], "--prompt", "héllo", "--max-new-tokens", "12")
    assert code == 0, err
    assert out.startswith("héllo") and "tokens/s" in err and "stopped by" in err


@pytest.mark.parametrize("args,words", [
    (["--prompt", "hi", "--temperature", "-1"], ["--temperature"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["top_p"]),
    (["--prompt", "hi", "--top-k", "0"], ["--top-k"]),
    (["--prompt", "hi", "--top-k", "3", "--filter-thres", "0.9"], ["top_k or filter_thres"]),
    (["--prompt", "hi", "--on-limit", "wrap"], ["on_limit"]),
    (["--prompt", "hi", "--eos-id", "300"], ["eos id 300"]),
    (["--prompt", "hi", "--stop", "ids:1,x"], ["comma-separated"]),
    (["--prompt-ids", "1,2,256"], ["256", "out of range"]),
])
def test_cli_bad_generation_options(exported, monkeypatch, capsys, args, words):
    code, out, err = gss_run(monkeypatch, capsys, exported[1], *args)
    assert code == 2, (code, out, err)
    assert all(w in out + err for w in words), out + err
    assert "Traceback" not in out + err
