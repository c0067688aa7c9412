"""`gss-export` end to end: success, every bad input, and a failed export leaving a good one untouched."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import SMALL, run_cli


@pytest.fixture(scope="module")
def wrapped_ckpt(tmp_path_factory, upstream):
    """What a training script typically saves: AutoregressiveWrapper weights nested under 'model'."""
    from gated_state_spaces_pytorch.autoregressive_wrapper import AutoregressiveWrapper

    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": AutoregressiveWrapper(upstream).state_dict(), "step": 10}, path)
    return path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_console_script_exports_and_validates(wrapped_ckpt, tmp_path):
    out = tmp_path / "onnx"
    proc = subprocess.run(
        ["gss-export", wrapped_ckpt, "--format", "onnx", "--output", out, "--max-seq-len", "300", "--lengths", "1,2,129,300"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stripped prefix 'net.'" in proc.stderr and "unwrapped 'model'" in proc.stderr
    assert "max rel error" in proc.stdout and "FAIL" not in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["max_seq_len"] == 300 and config["export"]["conv"] == "switch" and config["export"]["opset"] == 20
    assert config["validation"]["ok"] and {r["length"] for r in config["validation"]["rows"]} == {1, 2, 129, 300}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder.onnx", "model.onnx", "prefill.onnx"]
    assert config["decoder_validation"]["ok"] and len(config["decoder_validation"]["rows"]) == 5
    assert config["export"]["prefill"] == {"file": "prefill.onnx", "conv": "monarch", "use_above_new_tokens": 128}


@pytest.mark.parametrize("make_bad,words", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("hello, I am a README"), "not a"),
    (lambda p: p.write_bytes(b""), "empty"),
])
def test_console_script_bad_input_is_one_message(tmp_path, make_bad, words):
    ckpt = tmp_path / "bad.pt"
    make_bad(ckpt)
    proc = subprocess.run(["gss-export", ckpt, "-o", tmp_path / "out"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) <= 12
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_earlier_export_untouched(monkeypatch, capsys, wrapped_ckpt, tmp_path):
    out = tmp_path / "model"
    code, _, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-o", out, "--max-seq-len", "64", "--lengths", "1,64")
    assert code == 0, err
    before = snapshot(out)

    # validation that cannot pass: exit 1, the table shown, nothing replaced
    code, stdout, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-o", out, "--max-seq-len", "64", "--lengths", "1,64", "--rtol", "0", "--opset", "20")
    assert code == 1 and "FAIL" in stdout and "nothing was written" in err
    assert snapshot(out) == before

    # a checkpoint that does not fit: exit 2, nothing replaced
    bad = tmp_path / "bad.pt"
    sd = torch.load(wrapped_ckpt, weights_only=True)["model"]
    sd.pop("net.to_logits.weight")
    sd["net.lm_head.weight"] = torch.zeros(3)
    torch.save(sd, bad)
    code, _, err = run_cli(monkeypatch, capsys, bad, "-o", out)
    assert code == 2 and "to_logits.weight" in err and "lm_head.weight" in err
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []  # no litter


def test_torchscript_export(monkeypatch, capsys, wrapped_ckpt, tmp_path):
    code, stdout, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-f", "torchscript", "-o", tmp_path, "--max-seq-len", "200", "--lengths", "1,129")
    assert code == 0, err
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    extra = {"config.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert json.loads(extra["config.json"])["export"]["conv"] == "fft"
    assert scripted(torch.zeros(2, 77, dtype=torch.long)).shape == (2, 77, SMALL["num_tokens"])
    # the scripted step (incremental decoding, runtime/cpp) is validated like the ONNX decoder
    steps = json.loads((tmp_path / "config.json").read_text())["decoder_validation"]
    assert steps["ok"] and steps["artifact"].endswith("model.pt (step, prefill)") and len(steps["rows"]) == 5
    assert "model.pt (step, prefill)" in stdout


def test_pt2_export_and_monarch_refused_for_torch_export(monkeypatch, capsys, wrapped_ckpt, tmp_path):
    code, stdout, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-f", "pt2", "-o", tmp_path, "--max-seq-len", "200", "--lengths", "1,45,200")
    assert code == 0, err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["export"]["conv"] == "fft2n" and config["validation"]["ok"] and config["decoder_validation"]["ok"]
    assert torch.export.load(str(tmp_path / "model.pt2")).module()(torch.zeros(2, 77, dtype=torch.long)).shape == (2, 77, SMALL["num_tokens"])
    before = snapshot(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-f", "aoti", "--conv", "monarch", "-o", tmp_path)
    assert code == 2 and "torch.export would fix" in err and "--conv fft or direct" in err
    assert snapshot(tmp_path) == before


def test_external_data_and_no_validate(monkeypatch, capsys, wrapped_ckpt, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-o", tmp_path, "--external-data", "--no-validate", "--conv", "fft", "--max-seq-len", "128")
    assert code == 0, err
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    assert json.loads((tmp_path / "config.json").read_text())["validation"] is None
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": np.zeros((1, 100), dtype=np.int64)})[0]
    assert logits.shape == (1, 100, SMALL["num_tokens"]) and np.isfinite(logits).all()


@pytest.mark.parametrize("args,code,words", [
    (["--opset", "5"], 2, "opset 5 is not supported"),
    (["--opset", "abc"], 2, "opset"),
    (["--format", "tflite"], 2, "format"),
    (["--max-seq-len", "0"], 2, "max-seq-len"),
    (["--lengths", "3,x"], 2, "--lengths"),
    (["--trust-pickle", "--conv", "sideways"], 2, "conv"),
])
def test_bad_options(monkeypatch, capsys, wrapped_ckpt, tmp_path, args, code, words):
    got, stdout, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-o", tmp_path / "out", *args)
    assert got == code and words in stdout + err
    assert "Traceback" not in stdout + err and not (tmp_path / "out").exists()


def test_output_path_is_a_file(monkeypatch, capsys, wrapped_ckpt, tmp_path):
    target = tmp_path / "occupied"
    target.write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, wrapped_ckpt, "-o", target, "--no-validate")
    assert code == 2 and "not a folder" in err and target.read_text() == "keep me"
