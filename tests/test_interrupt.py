"""Interrupted and killed runs: SIGINT/SIGTERM at every phase of an export leave the earlier export byte for byte
and no staging folder; litter of killed runs is removed by the next run, a live run's never; gss-run ends cleanly.
A run started with SIGINT ignored keeps it ignored, and SIGTERM still interrupts it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from tiny import TINY_MAX_LEN, tiny_checkpoint

from gss_export import artifacts
from gss_export.artifacts import remove_stale_staging, staged_output

PHASES = ("load", "export", "validate", "decoder", "publish")
SIGNALS = ("SIGINT", "SIGTERM")
# torchscript: the whole export with validation takes under a second for the tiny model
QUICK = ("-f", "torchscript", "--max-seq-len", str(TINY_MAX_LEN), "--lengths", "1,32", "--batch-sizes", "1")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def staging_of(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-"))


@pytest.fixture(autouse=True)
def sigint_handled():
    """SIGINT handled in this process, whatever the test run inherited (under `nohup` or `cmd &` in a script it is
    ignored, and gss-export keeps an ignored SIGINT ignored); children started here get the default (exec resets
    a handled signal, not an ignored one)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ignore_sigint() -> None:
    """preexec_fn: the child starts with SIGINT ignored, as a background job of a script does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture
def good(monkeypatch, capsys, ckpt, tmp_path):
    """An output folder holding a good export, and its bytes."""
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, ckpt, "-o", out, *QUICK)
    assert code == 0, err
    return out, snapshot(out)


def test_signal_at_every_phase_leaves_the_earlier_export(monkeypatch, capsys, ckpt, good):
    out, before = good
    for phase in PHASES:
        for name in SIGNALS:
            monkeypatch.setenv("GSS_EXPORT_SIGNAL_AT", f"{phase}:{name}")
            # --rtol: a different config.json, so a publish that went through would show
            code, stdout, err = run_cli(monkeypatch, capsys, ckpt, "-o", out, *QUICK, "--rtol", "1e-3")
            assert code == 128 + getattr(signal, name), (phase, name, err)
            assert err.strip().splitlines()[-1] == f"interrupted by {name}: nothing was written to {out}", err
            assert "Traceback" not in stdout + err and "wrote" not in stdout
            assert snapshot(out) == before and staging_of(out) == [], (phase, name)


@pytest.mark.parametrize("how", ["signal", "exception"])
def test_interrupted_while_files_are_moved_in_restores_the_old_ones(monkeypatch, tmp_path, how):
    """Between two of the publishing renames: a signal (deferred, then every renamed file goes back) or an
    exception raised right there (a KeyboardInterrupt outside the main thread's handlers: the same)."""
    real = os.replace

    def interrupting(after: int):
        calls = []

        def replace(src, dst):  # interrupts once: the renames that put things back run normally
            if len(calls) == after and how == "exception":
                calls.append(None)
                raise KeyboardInterrupt
            real(src, dst)
            calls.append(dst)
            if len(calls) == after and how == "signal":
                signal.raise_signal(signal.SIGINT)
        return replace

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old model")
    (out / "config.json").write_text("old config")
    before = snapshot(out)
    # five renames: extra.bin in; model.onnx aside, in; config.json aside, in (a signal after the last one still counts)
    for after in range(1, 6) if how == "signal" else range(5):
        monkeypatch.setattr(artifacts.os, "replace", interrupting(after))
        with pytest.raises(KeyboardInterrupt):
            with staged_output(out) as staging:
                for name in ("model.onnx", "extra.bin", "config.json"):
                    (staging / name).write_bytes(b"new " + name.encode())
        monkeypatch.setattr(artifacts.os, "replace", real)
        assert snapshot(out) == before and staging_of(out) == [], after
    # into a folder that did not exist: it does not exist afterwards either
    monkeypatch.setattr(artifacts.os, "replace", interrupting(1))
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path / "fresh") as staging:
            for name in ("a", "config.json"):
                (staging / name).write_bytes(b"x")
    assert not (tmp_path / "fresh").exists() and staging_of(tmp_path / "fresh") == []


def test_sigterm_still_interrupts_with_sigint_ignored(monkeypatch, capsys, ckpt, good):
    out, before = good
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for phase in PHASES:
        monkeypatch.setenv("GSS_EXPORT_SIGNAL_AT", f"{phase}:SIGINT,{phase}:SIGTERM")
        code, _, err = run_cli(monkeypatch, capsys, ckpt, "-o", out, *QUICK, "--rtol", "1e-3")
        assert code == 143 and err.strip().splitlines()[-1] == f"interrupted by SIGTERM: nothing was written to {out}", err
        assert snapshot(out) == before and staging_of(out) == [], phase
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_ignored_sigint_while_files_are_moved_in_is_ignored(monkeypatch, tmp_path):
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        signal.raise_signal(signal.SIGINT)

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old model")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    monkeypatch.setattr(artifacts.os, "replace", replace)
    with staged_output(out) as staging:
        for name in ("model.onnx", "config.json"):
            (staging / name).write_bytes(b"new " + name.encode())
    assert snapshot(out) == {"config.json": b"new config.json", "model.onnx": b"new model.onnx"}
    assert staging_of(out) == [] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_started_with_sigint_ignored_ctrl_c_does_not_stop_it(ckpt, good):
    """A background job of a script (SIGINT ignored from the start): SIGINT from outside, again and again, and
    from itself at every phase; the export goes through."""
    out, before = good
    every_phase = ",".join(f"{phase}:SIGINT" for phase in PHASES)
    proc = subprocess.Popen([sys.executable, "-m", "gss_export.cli", str(ckpt), "-o", str(out), *QUICK, "--rtol", "1e-3"],
                            env={**os.environ, "GSS_EXPORT_SIGNAL_AT": every_phase}, preexec_fn=ignore_sigint,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the export never ended"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0 and "wrote" in stdout, stderr
    assert snapshot(out) != before and staging_of(out) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_killed_runs_litter_is_removed_by_the_next_run_but_a_live_runs_is_not(monkeypatch, capsys, ckpt, good):
    out, _ = good
    # real kills: SIGKILL while validating, the staging folder (owner in its name) already holding model.pt;
    # each killed run removes the one before it, so litter does not pile up
    killed = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "gss_export.cli", str(ckpt), "-o", str(out), *QUICK],
                              env={**os.environ, "GSS_EXPORT_SIGNAL_AT": "validate:SIGKILL"}, capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        killed.append(staging_of(out))
        assert len(killed[-1]) == 1 and (out.parent / killed[-1][0] / "model.pt").is_file()
    assert killed[0] != killed[1]
    me = f"{os.getpid()}-{artifacts._start_time(os.getpid())}"
    made = {
        "dead": f".out.staging-{_dead_pid()}-0-abc",
        "reused pid": f".out.staging-{me.split('-')[0]}-1-abc",  # our pid, another start time: a reused pid
        "live": f".out.staging-{me}-abc",  # this process: a concurrent export still running
        "old ownerless": ".out.staging-k2j3h4l5",  # an older version's, an hour old
        "new ownerless": ".out.staging-a1b2c3d4",
        "another output's": ".out2.staging-1-0-abc",
    }
    for name in made.values():
        (out.parent / name).mkdir()
        (out.parent / name / "model.onnx").write_bytes(b"partial")
    hour_ago = time.time() - artifacts.ORPHAN_AGE_S - 60
    os.utime(out.parent / made["old ownerless"], (hour_ago, hour_ago))
    code, _, err = run_cli(monkeypatch, capsys, ckpt, "-o", out, *QUICK)
    assert code == 0, err
    assert staging_of(out) == sorted([made["live"], made["new ownerless"]])
    assert (out.parent / made["another output's"]).is_dir()
    assert remove_stale_staging(out) == []


def test_sigterm_from_another_process_while_building_onnx(ckpt, good):
    """A real signal from outside, at a moment seen from outside: the ONNX build has written model.onnx."""
    out, before = good
    proc = subprocess.Popen([sys.executable, "-m", "gss_export.cli", str(ckpt), "-o", str(out), "--max-seq-len", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any((out.parent / s / "model.onnx").exists() for s in staging_of(out)) and proc.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted by SIGTERM: nothing was written to {out}"
    assert "Traceback" not in stderr and snapshot(out) == before and staging_of(out) == []


@pytest.mark.parametrize("name", SIGNALS)
def test_gss_run_interrupted_mid_stream(example_onnx, name):
    """Ctrl-C (or SIGTERM) while tokens stream: the line ends, one message, exit 130 (143)."""
    proc = subprocess.Popen([sys.executable, "-m", "gss_runtime.cli", str(example_onnx), "--prompt", "The for",
                             "--max-new-tokens", "100000", "--on-limit", "slide"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(len("The for") + 3).startswith(b"The for")  # the prompt and generated text are streaming
    proc.send_signal(getattr(signal, name))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, name), stderr
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {name} after ") and lines[0].endswith(" tokens"), lines
    assert stdout.endswith(b"\n")
