"""gss-serve in production: API keys on every route, and bounds on every part of a request.

One live server on the bundled example, with a key from each source (--api-key, --api-key-file,
$GSS_API_KEY) and short deadlines, serves most tests here; the routes checked for a key are read from
the application itself, so a route added later is checked without naming it. In-process apps (TestClient)
cover --public-metrics and the fuzzing of heads and bodies.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import event, given
from hypothesis import strategies as st

from serve_support import live_server, metrics, wait_for
from tiny import fuzz

KEY, FILE_KEY, ENV_KEY = "sk-gss-arg-0123456789", "sk-gss-file-abcdef", "sk-gss-env-XYZ"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW = 2.0  # the live server's --body-timeout and --header-timeout, seconds
MIB = 2**20


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# the file's keys\n\n  {FILE_KEY}  \n# another comment\n")
    return path


@pytest.fixture(scope="module")
def server(example_onnx, key_file):
    """gss-serve with three keys (one from each source) and deadlines of 2 s; the other limits at their defaults."""
    with live_server(example_onnx, "--api-key", KEY, "--api-key-file", str(key_file), "--threads", "1",
                     "--max-batch", "4", "--max-queue", "8", "--body-timeout", str(SLOW), "--header-timeout", str(SLOW),
                     env={"GSS_API_KEY": ENV_KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def routes(example_onnx):
    """(method, path) for every route the application serves, from its own route table."""
    from gss_runtime.serve.app import ModelHost, build_app

    app = build_app(ModelHost(example_onnx), load=False)
    out = sorted({(m, re.sub(r"\{[^}]*\}", "x", r.path)) for r in app.routes for m in getattr(r, "methods", None) or ()})
    assert {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions")} <= set(out)
    return out


def ask(url: str, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=30, content=b"{}" if method == "POST" else None)


def is_key_error(reply: httpx.Response, method: str) -> bool:
    if reply.status_code != 401:
        return False
    assert reply.headers["www-authenticate"].startswith("Bearer")
    if method != "HEAD":
        assert reply.json() == {"error": {"message": reply.json()["error"]["message"], "type": "invalid_request_error",
                                          "param": None, "code": "invalid_api_key"}}
    return True


# ---- API keys ----------------------------------------------------------------------------------------

def test_every_route_but_health_needs_a_key(server, routes):
    """No key, a wrong one, a malformed header: 401 on every route and method the app declares (and on a
    path it does not serve); any of the three keys gets through. /health is open; /metrics is not."""
    for method, path in routes + [("GET", "/no/such/route"), ("POST", "/v1/completions/")]:
        refused = [is_key_error(ask(server, method, path, headers), method) for headers in
                   (None, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"})]
        assert refused == [path != "/health"] * len(refused), (method, path, refused)
        for key in (KEY, FILE_KEY, ENV_KEY):
            reply = ask(server, method, path, {"Authorization": f"Bearer {key}"})
            assert reply.status_code != 401, (method, path, reply.text)
    assert ask(server, "GET", "/no/such/route", AUTH).status_code == 404
    for spelled in (f"bearer  {FILE_KEY}", f"BEARER\t{FILE_KEY}"):  # the scheme in any case, any blanks
        assert ask(server, "GET", "/metrics", {"authorization": spelled}).status_code == 200
    two = httpx.get(f"{server}/v1/models", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer x")])
    assert two.status_code == 401  # two Authorization headers: ambiguous, refused
    assert metrics(server, AUTH)["gss_request_rejected_total{status=401}"] >= 6 * len(routes)


def test_the_openai_client_with_a_key(server):
    api = openai.OpenAI(base_url=f"{server}/v1", api_key=ENV_KEY, max_retries=0, timeout=60)
    name = api.models.list().data[0].id
    done = api.completions.create(model=name, prompt="The for statement", max_tokens=5, temperature=0)
    assert len(done.choices[0].token_ids) == 5
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).completions.create(
            model=name, prompt="x", max_tokens=1)


def test_public_metrics_opens_metrics_and_nothing_else(example_onnx):
    from gss_runtime.serve.app import ModelHost, build_app
    from gss_runtime.serve.guard import GuardOptions

    for public in (False, True):
        app = build_app(ModelHost(example_onnx), load=False, guard=GuardOptions(api_keys=("k1",), public_metrics=public))
        with TestClient(app) as client:
            assert client.get("/metrics").status_code == (200 if public else 401)
            assert client.get("/v1/models").status_code == 401
            assert client.get("/health").status_code == 503  # open, and not loaded here
            assert client.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
    # no key configured: every route open, as before
    with TestClient(build_app(ModelHost(example_onnx), load=False)) as client:
        assert client.get("/metrics").status_code == 200


def run_serve(monkeypatch, capsys, *args, env=None):
    """In-process `gss-serve ARGS`: (exit code, stderr)."""
    import sys

    from gss_runtime.serve.cli import main

    monkeypatch.setattr(sys, "argv", ["gss-serve", *map(str, args)])
    monkeypatch.delenv("GSS_API_KEY", raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        main()
    return exit.value.code, capsys.readouterr().err


def test_a_key_file_that_cannot_be_used_is_one_line_and_a_failure(example_onnx, tmp_path, monkeypatch, capsys):
    comments = tmp_path / "comments.txt"
    comments.write_text("# no key yet\n\n")
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("sk-one two\n")
    cases = [(["--api-key-file", tmp_path / "missing.txt"], {}, "cannot read it"),
             (["--api-key-file", tmp_path], {}, "cannot read it"),
             (["--api-key-file", comments], {}, "holds no key"),
             (["--api-key-file", spaced], {}, "line 1: an API key must be"),
             (["--api-key", "has space"], {}, "an API key must be"),
             ([], {"GSS_API_KEY": " "}, "GSS_API_KEY is set but empty")]
    for args, env, message in cases:
        code, err = run_serve(monkeypatch, capsys, example_onnx, *args, env=env)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
        assert "two" not in err and "has space" not in err  # a key is never shown


def test_the_command_line_options_reach_the_guard(example_onnx):
    from gss_runtime.serve.cli import guard_of, parser
    from gss_runtime.serve.guard import GuardOptions

    args = parser().parse_args([str(example_onnx), "--api-key", "a", "--api-key", "b", "--public-metrics",
                                "--max-body-bytes", "1000", "--body-timeout", "1.5", "--header-timeout", "3",
                                "--max-header-bytes", "2000", "--max-headers", "7", "--max-prompts", "5", "--max-json-depth", "4"])
    got = guard_of(args, environ={"GSS_API_KEY": "c"})
    assert got == GuardOptions(api_keys=("a", "b", "c"), public_metrics=True, max_body_bytes=1000, body_timeout=1.5,
                               header_timeout=3, max_header_bytes=2000, max_headers=7, max_prompts=5, max_json_depth=4)
    assert "'a'" not in repr(got)  # keys stay out of reprs and logs
    assert guard_of(parser().parse_args([str(example_onnx)]), environ={}) == GuardOptions()
    for bad in (["--max-body-bytes", "0"], ["--body-timeout", "0"], ["--body-timeout", "nan"], ["--max-prompts", "-1"]):
        with pytest.raises(SystemExit):
            parser().parse_args([str(example_onnx), *bad])


def test_the_ray_application_takes_the_same_options(example_onnx, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("GSS_API_KEY", raising=False)
    from gss_runtime.serve.guard import GuardOptions
    from gss_runtime.serve.ray_app import application, build

    keys = tmp_path / "keys"
    keys.write_text("k2\n")
    deployment = build({"model": str(example_onnx), "api_key": "k1", "api_key_file": str(keys), "public_metrics": "true",
                        "max_body_bytes": "1000", "body_timeout": "2.5", "max_prompts": "3", "max_batch": "4"})._bound_deployment
    assert deployment.init_args[1] == {"max_batch": 4}
    assert deployment.init_args[2] == GuardOptions(api_keys=("k1", "k2"), public_metrics=True, max_body_bytes=1000,
                                                   body_timeout=2.5, max_prompts=3)
    plain = application(example_onnx)._bound_deployment.init_args[2]
    assert plain == GuardOptions()
    given_guard = GuardOptions(api_keys=("z",))
    assert application(example_onnx, guard=given_guard)._bound_deployment.init_args[2] is given_guard
    for bad in ({"api_key_file": str(tmp_path / "missing")}, {"public_metrics": "maybe"}, {"max_headers": "0"}):
        with pytest.raises(ValueError):
            build({"model": str(example_onnx), **bad})


# ---- request limits, live ----------------------------------------------------------------------------

def post(url: str, content, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=content, headers={**AUTH, **(headers or {})}, timeout=timeout)


def error_of(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text[:300]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def memory_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakMemory:
    """The most resident memory a process reaches while the block runs (its VmHWM, reset first where the
    kernel allows, and VmRSS sampled every 2 ms), less its resident memory before: MB."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._running = pid, 0, True

    def __enter__(self):
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.hwm = True
        except OSError:
            self.hwm = False
        self.before = memory_kib(self.pid, "VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, memory_kib(self.pid, "VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        if self.hwm:
            self.peak = max(self.peak, memory_kib(self.pid, "VmHWM"))
        self.grew_mb = (self.peak - self.before) / 1024


def test_a_body_too_large_is_refused_as_it_arrives(server):
    """Declared too long: 413 before a byte of it is read. Chunked, 60 MB: 413 once past the 4 MiB limit,
    and the server's memory grows by far less than the body."""
    error = error_of(post(server, b"x" * (4 * MIB + 1)), 413)
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]

    def sixty_mb():
        for _ in range(60):
            yield b"x" * MIB

    with PeakMemory(server.process.pid) as memory:
        reply = post(server, sixty_mb())
    error_of(reply, 413)
    assert memory.grew_mb < 100, memory.grew_mb
    assert post(server, json.dumps({"prompt": "ab", "max_tokens": 2})).status_code == 200  # and it goes on


def test_a_long_text_prompt_is_refused_before_it_is_encoded(server):
    """3 MB of text (within the body limit) for a model of 2048 positions: 400, without the 3 M-element
    list of byte ids its encoding would make (24 MB of pointers alone)."""
    body = json.dumps({"prompt": "é" * 1_500_000, "max_tokens": 1}, ensure_ascii=False).encode()
    with PeakMemory(server.process.pid) as memory:
        error = error_of(post(server, body), 400)
    assert error["code"] == "context_length_exceeded" and "at least 1500000 tokens" in error["message"]
    assert memory.grew_mb < 100, memory.grew_mb


def raw_exchange(url: str, head: bytes, body_pieces=(), pause: float = 0.0, wait: float = 10.0) -> bytes:
    """Send a request over a plain socket (the body piece by piece, `pause` apart); what comes back until
    the server closes or `wait` seconds pass."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(wait)
        try:
            s.sendall(head)
            for piece in body_pieces:
                time.sleep(pause)
                s.sendall(piece)
        except OSError:  # the server may close on a head or body it refuses
            pass
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and _complete(out):
                break
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.I)
    return length is not None and len(body) >= int(length.group(1))


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def completion_head(length: int | None, key: str = KEY) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{size}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed (monotonic; inf if it did not)."""
    sock.settimeout(0.2)
    out, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return out, time.monotonic()
        if not chunk:
            return out, time.monotonic()
        out += chunk
    return out, float("inf")


def test_a_refused_body_is_dropped_for_a_bounded_time(server):
    """After a 413 the rest of the body is read and dropped, so the client can send it all and read the
    answer; the connection then closes once idle for --header-timeout, and one whose body never ends is
    closed --body-timeout after the answer."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(completion_head(5 * MIB) + b"x" * (5 * MIB))
        sent = time.monotonic()
        reply, closed = read_until_closed(s, SLOW + 10)
    assert status_of(reply) == 413 and b"connection: close" not in reply.lower()
    assert SLOW - 0.1 < closed - sent < SLOW + 6
    with socket.create_connection((host, int(port))) as s:
        s.sendall(completion_head(5 * MIB))
        started = time.monotonic()
        with pytest.raises(OSError):  # the server closes while the body is still coming
            while time.monotonic() - started < SLOW + 10:
                s.sendall(b"x" * 1024)
                time.sleep(0.05)
        assert time.monotonic() - started < SLOW + 6


def test_a_body_too_slow_gets_408(server):
    """A body that stops: 408 at --body-timeout; a head that stops halfway: 408 at --header-timeout; a
    connection that sends nothing is closed then (the three at once)."""
    def timed(head: bytes, pieces=()):
        started = time.monotonic()
        reply = raw_exchange(server, head, pieces, wait=SLOW + 8)
        return reply, time.monotonic() - started

    with ThreadPoolExecutor(3) as pool:
        body, head, nothing = pool.map(lambda case: timed(*case), [
            (completion_head(100), [b'{"prompt": ']), (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",), (b"",)])
    for (reply, took), option in ((body, b"--body-timeout"), (head, b"--header-timeout")):
        assert status_of(reply) == 408 and b"connection: close" in reply.lower() and option in reply
        assert SLOW - 0.1 < took < SLOW + 5
    assert nothing[0] == b"" and SLOW - 0.1 < nothing[1] < SLOW + 5


def test_a_slow_client_does_not_stall_a_stream(server):
    """While a client sends its body a byte every 20 ms, another's stream keeps its pace; then the slow
    one gets its answer."""
    arrivals: list[float] = []
    done = threading.Event()

    def stream():
        body = {"prompt": "The for statement", "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60, headers=AUTH) as client:
            with client.stream("POST", f"{server}/v1/completions", json=body) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
                    if done.is_set():  # leaves: the server drops the request
                        break

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert wait_for(lambda: len(arrivals) >= 5, within=60)
    body = json.dumps({"prompt": "slow", "max_tokens": 2}).encode()
    started = time.perf_counter()
    reply = raw_exchange(server, completion_head(len(body)), [bytes([b]) for b in body], pause=0.02, wait=30)
    sent = time.perf_counter()
    done.set()
    streaming.join()
    assert status_of(reply) == 200, reply[:300]
    assert sent - started > 0.02 * len(body)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if started <= a and b <= sent]
    assert len(gaps) >= 20, len(gaps)  # chunks went on arriving while the slow body did
    assert max(gaps) < 0.25, max(gaps)


def test_heads_too_large_get_4xx_or_a_closed_connection(server):
    """A header of 40 KB, 150 header fields, a URL of 40 KB, a header of 1 MB still arriving: each a 431
    (414 for the URL) or a closed connection, never a 500; the server goes on."""
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n"
    url = b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MIB
    for head, want in ((big, 431), (many, 431), (url, 414), (flood, 431)):
        reply = raw_exchange(server, head)
        assert reply == b"" or status_of(reply) == want, reply[:200]
        if reply:
            assert b'"code": "' in reply
    assert status_of(raw_exchange(server, big.replace(b"a" * 40_000, b"a" * 20_000))) == 200  # under the limit
    assert httpx.get(f"{server}/health").status_code == 200


DEEP = 100_000


@pytest.mark.parametrize("body, message", [
    (b"[" * DEEP + b"]" * DEEP, "nests arrays and objects more than 32 deep"),
    (b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "more than 32 deep"),
    (b'{"prompt": "' + b"[" * DEEP + b'", "max_tokens": 1}', "has at least"),  # brackets in a string are text
    (b'{"prompt": "\\ud800", "max_tokens": 1}', "prompt holds a lone surrogate"),
    (b'{"prompt": ["ok", "\\udfffx"], "max_tokens": 1}', "prompt[1] holds a lone surrogate"),
    (b'{"prompt": "a", "user": "\\ud83d"}', "user holds a lone surrogate"),
    (b'{"prompt": "a", "\\ud800": 1}', "a key of the body holds a lone surrogate"),
    (b'{"prompt": "a", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "a", "temperature": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "a", "top_p": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "a", "temperature": 1e999}', "out of range"),
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'{"prompt": "a", "prompt": "b"}', 'duplicate key "prompt"'),
    (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    ('{"prompt": "a"}'.encode("utf-16"), "not valid UTF-8"),
    (json.dumps({"prompt": ["a"] * 257}).encode(), "257 prompts in one request; this server takes at most 256"),
    (json.dumps({"prompt": [[1]] * 300}).encode(), "300 prompts"),
    (b"", "not valid JSON"),
])
def test_bodies_no_parser_should_take_get_400(server, body, message):
    error = error_of(post(server, body), 400)
    assert message in error["message"], error


def test_a_body_within_the_limits_is_served(server):
    """The boundaries themselves: 32 deep, a surrogate pair, a byte order mark, 256 prompts (past the
    server's 12 places: refused for that instead, which the limit comes before)."""
    nested = {"prompt": "a", "max_tokens": 1, "logit_bias": None}
    assert post(server, json.dumps(nested)).status_code == 200
    deep = b'{"prompt": ' + b"[" * 31 + b"1" + b"]" * 31 + b"}"  # 32 with the object: a type error, not the depth
    assert "deep" not in error_of(post(server, deep), 400)["message"]
    pair = post(server, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert pair.status_code == 200 and pair.json()["usage"]["prompt_tokens"] == 4
    assert post(server, b"\xef\xbb\xbf" + b'{"prompt": "a", "max_tokens": 1}').status_code == 200
    error = error_of(post(server, json.dumps({"prompt": ["a"] * 256, "max_tokens": 1})), 400)
    assert "--max-prompts" not in error["message"]


# ---- fuzzing: heads and bodies, in process -----------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_app(example_onnx):
    """A TestClient over the app with a key and small limits, so that fuzzed requests reach every refusal."""
    from gss_runtime.serve.app import ModelHost, build_app
    from gss_runtime.serve.guard import GuardOptions

    options = GuardOptions(api_keys=(KEY,), max_body_bytes=4096, max_header_bytes=2048, max_headers=24, max_prompts=4,
                           max_json_depth=8)
    with TestClient(build_app(ModelHost(example_onnx, threads=1, max_batch=4, max_queue=4), guard=options)) as client:
        assert wait_for(lambda: client.get("/health").status_code == 200, within=60)
        yield client


def test_the_limits_given_reach_the_parser(guarded_app):
    """The app's own limits (4 prompts, 8 deep, 4096 bytes), not the defaults, whichever route parses the body."""
    auth = {"Authorization": f"Bearer {KEY}"}
    error = guarded_app.post("/v1/completions", json={"prompt": ["a"] * 5}, headers=auth).json()["error"]
    assert "at most 4 (--max-prompts)" in error["message"]
    for path, body in (("/v1/completions", '{"prompt": ' + "[" * 8 + "1" + "]" * 8 + "}"),
                       ("/tokenize", '{"prompt": "a", "model": ' + "[" * 8 + "]" * 8 + "}")):
        error = guarded_app.post(path, content=body, headers=auth).json()["error"]
        assert "more than 8 deep" in error["message"], (path, error)
    assert guarded_app.post("/detokenize", content=b" " * 4097, headers=auth).status_code == 413


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each `weight` times as likely as a strategy of weight 1."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


PATHOLOGICAL = st.sampled_from([  # text that JSON parsers, or what follows them, trip on
    '"\\ud800"', '"\\udc00x"', '["a", "\\udbff"]', '"\\ud83d\\ude00"', "NaN", "Infinity", "-Infinity", "1e999", "-1e400",
    "1" * 4400, "9" * 4000, "1" * 20, "-0", "1.5e-400", '{"a": 1, "a": 2}', '"\\u0000"', '"\\"', "[", "]", "{", '"unterminated', "\\",
    '"\\\\"', "[[[[[[[[[[1]]]]]]]]]]", "[" * 3000])
VALUES = st.one_of(st.sampled_from(['"a"', "[1, 2]", "[[1], [2]]", '["a", "b"]', "{}", "null", "true"]),
                   st.text(max_size=12).map(json.dumps), st.lists(st.integers(0, 255), min_size=1, max_size=5).map(json.dumps))
FRAGMENTS = weighted(
    (4, PATHOLOGICAL),
    (3, VALUES),
    (1, st.integers(0, 60).map(lambda n: "[" * n + "]" * n)),
    (1, st.integers(0, 12).map(lambda n: '{"a": ' * n + "1" + "}" * n)),
    (1, st.integers(0, 12).map(lambda n: "[" * n + '"' + "[" * 30 + '"' + "]" * n)),  # brackets in a string are text
)
FIELD = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "stop", "user", "logit_bias", "stream", "seed", "n"])


@st.composite
def bodies(draw) -> bytes:
    kind = draw(weighted((5, st.just("template")), (1, st.just("fragment")), (1, st.just("binary")), (1, st.just("big"))))
    if kind == "binary":
        return draw(st.binary(max_size=24))
    if kind == "big":  # past the 4096-byte limit, or just within it
        return json.dumps({"prompt": "a" * draw(st.integers(4000, 5000)), "max_tokens": 1}).encode()
    if kind == "fragment":
        text = draw(FRAGMENTS)
    else:
        fields = {"prompt": draw(weighted((1, VALUES), (1, FRAGMENTS))), "max_tokens": draw(st.sampled_from(["1", "2", "0"]))}
        fields.update({draw(FIELD): draw(FRAGMENTS) for _ in range(draw(st.integers(0, 2)))})
        text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    encoding = draw(weighted((8, st.just("utf-8")), (1, st.sampled_from(["utf-8-sig", "utf-16", "latin-1"]))))
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
AUTHORIZATIONS = weighted(  # mostly the key, so that most requests go on to the body's checks
    (6, st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "])),
    (1, st.none()),
    (1, st.sampled_from(["Bearer wrong", "Bearer", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}", f"Bearer {KEY}{KEY}"])),
    (1, HEADER_TEXT))


@st.composite
def heads(draw) -> tuple[str, str, dict]:
    method = draw(weighted((8, st.just("POST")), (1, st.sampled_from(["GET", "PUT", "DELETE", "OPTIONS", "HEAD"]))))
    path = draw(weighted((8, st.just("/v1/completions")), (1, st.sampled_from([
        "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/nope", "/v1/completions/", "/docs"]))))
    headers = {}
    authorization = draw(AUTHORIZATIONS)
    if authorization is not None:
        headers["authorization"] = authorization
    if draw(st.booleans()):
        headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]) | HEADER_TEXT)
    for i in range(draw(weighted((8, st.just(0)), (1, st.just(3)), (1, st.just(30))))):  # 30: past the 24 fields taken
        headers[f"x-extra-{i}"] = draw(HEADER_TEXT)
    if draw(weighted((8, st.just(False)), (1, st.just(True)))):
        headers["x-big"] = "b" * draw(st.integers(1000, 3000))  # past 2048 bytes of head, or within it
    return method, path, headers


ANSWERS = {200, 400, 401, 404, 405, 408, 413, 414, 429, 431}


@fuzz(150)
@given(head=heads(), body=bodies())
def test_fuzzed_heads_and_bodies_get_an_answer_never_a_500(guarded_app, head, body):
    """A TestClient raises what the app raises, so a 500 fails here with its traceback."""
    method, path, headers = head
    reply = guarded_app.request(method, path, headers=headers, content=body if method not in ("GET", "HEAD") else None)
    assert reply.status_code in ANSWERS, (head, body[:200], reply.status_code, reply.text[:300])
    event(f"status {reply.status_code}")
    if reply.status_code >= 400 and method != "HEAD":
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert guarded_app.get("/health").status_code == 200


def depth_by_hand(raw: bytes) -> int:
    """The deepest nesting, a byte at a time: a quote after an odd run of backslashes does not count."""
    depth = deepest = slashes = 0
    inside = False
    for byte in raw:
        if byte == 0x22 and slashes % 2 == 0:
            inside = not inside
        elif not inside and byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not inside and byte in b"]}":
            depth -= 1
        slashes = slashes + 1 if byte == 0x5C else 0
    return deepest


@fuzz(400)
@given(raw=st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b","]), max_size=60).map(b"".join),
       block=st.sampled_from([1, 2, 3, 7, 64]), limit=st.integers(0, 6))
def test_the_nesting_scan_equals_a_byte_by_byte_count(raw, block, limit):
    """guard's numpy scan, over blocks as small as a byte (its carries: backslash runs, quotes, depth)."""
    from gss_runtime.serve import strict_json as guard

    saved, guard._SCAN_BLOCK = guard._SCAN_BLOCK, block
    try:
        assert guard.nesting_depth_exceeds(raw, limit) == (depth_by_hand(raw) > limit)
    finally:
        guard._SCAN_BLOCK = saved
