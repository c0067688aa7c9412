"""Starting a live gss-serve for tests, and reading its /metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerURL(str):
    """A live server's base URL, which also holds its process (`.process.pid`)."""

    process: subprocess.Popen


@contextmanager
def live_server(model: Path, *options: str, ready_within: float = 90.0, env: dict[str, str] | None = None):
    """`gss-serve MODEL OPTIONS` on a free loopback port, as a user runs it; yields its base URL (a ServerURL).

    env: variables added to the server's environment; $GSS_API_KEY is not passed on from the tests' own
    unless given there, so that a key a developer has set cannot close the servers other tests start."""
    port = free_port()
    command = Path(sys.executable).with_name("gss-serve")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    environment = {k: v for k, v in os.environ.items() if k != "GSS_API_KEY"} | dict(env or {})
    proc = subprocess.Popen([str(command), str(model), "--port", str(port), "--log-level", "warning", *options],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=environment)
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.process = proc
    deadline = time.monotonic() + ready_within
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"gss-serve exited with {proc.returncode}: {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gss-serve was not healthy within {ready_within} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        output = log.read()
        log.close()
        assert "Traceback" not in output, f"the server logged a traceback:\n{output[-3000:]}"


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics parsed as Prometheus text: sample name (with labels, if any) -> value. headers: an API key's."""
    reply = httpx.get(f"{url}/metrics", timeout=10, headers=headers)
    reply.raise_for_status()
    return parse_metrics(reply.text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: sample name (with labels, if any) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def process_memory(pid: int) -> dict[str, int]:
    """A process's VmHWM (peak resident) and VmRSS, in bytes, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def wait_for(check, within: float = 20.0, every: float = 0.05):
    """Poll check() until it is truthy; its last value."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
