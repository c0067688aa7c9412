"""What gss-serve checks before a request reaches a route: API keys, and bounds on every part of a request.

- `Guard`, pure ASGI middleware around the whole application (so a route added later is covered without
  naming it): the request head's size (431, 414), `Authorization: Bearer KEY` on every path but
  /health (and /metrics with `public_metrics`; 401), then the body, read whole under a size limit (413,
  as soon as it is passed) and a deadline (408), and handed on to the app. Streams are untouched: the
  middleware wraps `receive` only until the body has been read, and never `send`.
- `parse_json`: a body as JSON, every failure a 400 (not UTF-8, nested too deep, NaN or Infinity, a
  float out of range, a duplicate key, a lone surrogate), never a RecursionError or a later
  UnicodeEncodeError; `check_prompt_count` bounds the prompts in one request.
- `uvicorn_settings`: the HTTP protocol gss-serve listens with: uvicorn's httptools protocol with the
  request head bounded in bytes, header count and time (uvicorn's own has no bound on any of the three);
  h11 with its incomplete-event limit where httptools is not installed.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import RuntimeInputError
from .protocol import APIError

API_KEY_ENV = "GSS_API_KEY"
OPEN_PATHS = ("/health",)  # answered without a key; /metrics too with public_metrics

# defaults (README, "Running in production", says why each)
MAX_BODY_BYTES = 4 * 2**20
BODY_TIMEOUT = 30.0
HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 32 * 2**10
MAX_HEADERS = 100
MAX_PROMPTS = 256
MAX_JSON_DEPTH = 32
# a head that never completes is refused once its raw bytes pass the limit by this much: what the limit counts
# (the URL, each header's name and value) leaves out the framing (the method, ': ' and CRLF per line)
HEAD_FRAMING_SLACK = 8 * 2**10


@dataclass(frozen=True)
class GuardOptions:
    """The server's access rule and request limits. No api_keys: every route is open, as without a guard."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never in a repr, a log or an error message
    public_metrics: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout: float = BODY_TIMEOUT
    header_timeout: float = HEADER_TIMEOUT
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    max_prompts: int = MAX_PROMPTS
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self):
        object.__setattr__(self, "api_keys", tuple(dict.fromkeys(self.api_keys)))  # in order, once each
        for i, key in enumerate(self.api_keys):
            _check_key(key, f"API key {i + 1}")
        for name in ("max_body_bytes", "max_header_bytes", "max_headers", "max_prompts", "max_json_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RuntimeInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("body_timeout", "header_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise RuntimeInputError(f"{name} must be a positive number of seconds, got {value!r}")


LIMITS = tuple(f.name for f in fields(GuardOptions) if f.name not in ("api_keys", "public_metrics"))


def guard_options(api_key: str | None = None, api_keys: Iterable[str] = (), api_key_file: str | Path | None = None,
                  environ: Mapping[str, str] | None = None, **settings: Any) -> GuardOptions:
    """GuardOptions from the keys given (one, several, a file of them, and $GSS_API_KEY) and the limits;
    RuntimeInputError (a ValueError) with one line for a key file that cannot be used or a key that cannot be sent."""
    unknown = set(settings) - set(LIMITS) - {"public_metrics"}
    if unknown:
        raise RuntimeInputError(f"unknown options {', '.join(sorted(unknown))}")
    if isinstance(api_keys, (str, bytes)):  # list("sk-1") would be four keys of a character each
        raise RuntimeInputError("api_keys takes a list of keys; give a single key as api_key")
    keys = ([api_key] if api_key is not None else []) + list(api_keys)
    if api_key_file is not None:
        keys += read_api_key_file(api_key_file)
    environ = os.environ if environ is None else environ
    if API_KEY_ENV in environ:
        key = environ[API_KEY_ENV].strip()
        if not key:  # set but empty: a mistake that would leave the server open, so an error
            raise RuntimeInputError(f"${API_KEY_ENV} is set but empty: give it a key, or unset it to serve without keys")
        _check_key(key, f"${API_KEY_ENV}")
        keys.append(key)
    for i, key in enumerate(keys):
        _check_key(key, f"API key {i + 1}")
    return GuardOptions(api_keys=tuple(keys), **settings)


def read_api_key_file(path: str | Path) -> list[str]:
    """The keys in a file, one a line; blank lines and lines starting with # are left out."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is not part of a key
    except OSError as e:
        raise RuntimeInputError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RuntimeInputError(f"--api-key-file {path}: not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            _check_key(line, f"--api-key-file {path}, line {number}")
            keys.append(line)
    if not keys:
        raise RuntimeInputError(f"--api-key-file {path} holds no key (only blank lines and # comments)")
    return keys


def _check_key(key: Any, where: str) -> None:
    # what a client can send in `Authorization: Bearer KEY`: printable ASCII without spaces (never echoed back)
    if not isinstance(key, str) or not key or not all("!" <= c <= "~" for c in key):
        raise RuntimeInputError(f"{where}: an API key must be a non-empty string of printable ASCII without spaces")


# ---- JSON bodies --------------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[GuardOptions] = contextvars.ContextVar("gss_guard_options")
_DEFAULT = GuardOptions()


def current_options() -> GuardOptions:
    """The options of the Guard this request came through (the defaults outside one)."""
    return _CURRENT.get(_DEFAULT)


_SCAN_BLOCK = 2**18  # bytes per numpy pass of the nesting scan: bounds its memory (a few MB) whatever the body
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def nesting_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays and objects deeper than `limit`, brackets within strings not counted.

    Linear, without recursion or parsing: numpy finds the quotes, backslashes and brackets of each block of
    the text, and the work past that is on them alone. A quote after an odd run of backslashes is escaped.
    For text that is not JSON it still bounds the depth a parser reaches before it fails (a parser stops at
    the first backslash outside a string, and up to it the two agree)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    data = np.frombuffer(raw, np.uint8)
    run = quotes = depth = 0  # backslashes ending the blocks so far; unescaped quotes so far; the depth
    for start in range(0, len(data), _SCAN_BLOCK):
        a = data[start:start + _SCAN_BLOCK]
        slashes = np.flatnonzero(a == 0x5C)
        firsts = slashes[np.r_[True, slashes[1:] != slashes[:-1] + 1]] if len(slashes) else slashes  # of each run
        quote_at = np.flatnonzero(a == 0x22)
        escaped = np.zeros(len(quote_at), bool)
        if len(quote_at) and (run or len(slashes)):
            # the run of backslashes just before each quote: from its first one to the quote, plus those that
            # ended the last block if it goes back to this block's start
            after_slash = quote_at > 0
            after_slash[after_slash] = a[quote_at[after_slash] - 1] == 0x5C
            run_start = firsts[np.maximum(np.searchsorted(firsts, quote_at, side="right") - 1, 0)] if len(firsts) else quote_at
            length = np.where(after_slash, quote_at - run_start + np.where(run_start == 0, run, 0), 0)
            escaped = np.where(quote_at == 0, run, length) % 2 == 1
        opening = quote_at[~escaped]
        folded = a | 0x20  # [ and { as {, ] and } as }
        brackets = np.flatnonzero((folded == 0x7B) | (folded == 0x7D))
        inside = (np.searchsorted(opening, brackets) + quotes) % 2 == 1
        step = np.where(folded[brackets] == 0x7B, 1, -1)[~inside]
        if len(step):
            levels = np.cumsum(step) + depth
            if levels.max() > limit:
                return True
            depth = int(levels[-1])
        quotes += len(opening)
        ends_in_run = len(slashes) and slashes[-1] == len(a) - 1
        run = len(a) - int(firsts[-1]) + (run if firsts[-1] == 0 else 0) if ends_in_run else 0
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_shown(key)}")
            seen.add(key)
    return out


def _shown(text: str, limit: int = 40) -> str:
    return json.dumps(text[:limit] + ("..." if len(text) > limit else ""))


def _lone_surrogate(data: Any) -> tuple[str, str | None] | None:
    """Where a string (or an object's key) holds a lone surrogate, as ("prompt[2]", "prompt"); None if nowhere."""
    stack = [(data, "", None)]
    while stack:
        value, where, param = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where or "the body", param
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return f"a key of {where or 'the body'}", param
                stack.append((item, f"{where}.{key}" if where else key, param or key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", param) for i, item in enumerate(value) if isinstance(item, (str, list, dict)))
    return None


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` as strict JSON (RFC 8259, UTF-8 with an optional byte order mark), or APIError(400) saying why not."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON as UTF-8") from None
    if nesting_depth_exceeds(raw, max_depth):
        raise APIError(400, f"the request body nests arrays and objects more than {max_depth} deep")
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)
    except RecursionError:  # not reached past the depth check; kept so that no body can make a 500
        raise APIError(400, "the request body nests arrays and objects too deeply") from None
    except ValueError as e:  # JSONDecodeError, and the hooks' refusals; a number of over 4300 digits too
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape can make one: strict UTF-8 has none
        found = _lone_surrogate(data)
        if found is not None:
            raise APIError(400, f"{found[0]} holds a lone surrogate (a \\uD800-\\uDFFF escape not in a pair), "
                                "which is not Unicode text", param=found[1])
    return data


def check_prompt_count(data: Any, limit: int) -> None:
    """At most `limit` prompts in one request (a list of strings or of id lists; one list of ids is one prompt)."""
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(prompt, list) and len(prompt) > limit and not isinstance(prompt[0], int):
        raise APIError(400, f"{len(prompt)} prompts in one request; this server takes at most {limit} (--max-prompts)",
                       param="prompt")


# ---- the middleware -----------------------------------------------------------------------------------

def _route_path(scope: dict) -> str:
    """The path as the router matches it (less the root path a proxy mounts the app under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def _error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


class Guard:
    """ASGI middleware: API keys and request limits before the application sees a request (module docstring).

    on_reject(status) is called for each request it refuses (the server counts them by status)."""

    def __init__(self, app, options: GuardOptions = _DEFAULT, on_reject: Callable[[int], None] = lambda status: None):
        self.app, self.options, self.on_reject = app, options, on_reject
        # keys compared as SHA-256 digests: equal lengths, so compare_digest's time says nothing of a key's length
        self._digests = tuple(hashlib.sha256(k.encode("ascii")).digest() for k in options.api_keys)
        self._open = set(OPEN_PATHS) | ({"/metrics"} if options.public_metrics else set())

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        token = _CURRENT.set(self.options)
        try:
            try:
                self._check_head(scope)
                self._check_key(scope)
            except _Refusal as refusal:
                if kind == "websocket":
                    await receive()  # websocket.connect
                    self.on_reject(refusal.status)
                    return await send({"type": "websocket.close", "code": 1008})  # policy violation
                # a body the client holds back for a 100 Continue will not come: the connection cannot be reused
                close = _has_body(scope) and _header(scope, b"expect") is not None
                return await self._refuse(send, refusal, close)
            if kind == "websocket":
                return await self.app(scope, receive, send)
            await self._handle(scope, receive, send)
        finally:
            _CURRENT.reset(token)

    async def _handle(self, scope, receive, send):
        limit = self.options.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before a byte of it is read
            return await self._refuse(send, self._too_large(declared), close=_header(scope, b"expect") is not None)
        try:
            async with _deadline(self.options.body_timeout):
                body = await self._read_body(receive, limit)
        except TimeoutError:
            return await self._refuse(send, _Refusal(
                408, f"the request body did not arrive within {self.options.body_timeout:g} s (--body-timeout)",
                "request_timeout"), close=True)
        if body is None:  # the client left before its body was whole: nobody to answer
            return
        if isinstance(body, _Refusal):
            return await self._refuse(send, body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _read_body(self, receive, limit: int):
        buffer = bytearray()  # not a list of chunks: a body sent a byte at a time costs a byte a byte
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            buffer += message.get("body", b"")
            if len(buffer) > limit:  # answered now; what is still coming is not kept (uvicorn drops it)
                return self._too_large(None)
            if not message.get("more_body", False):
                return bytes(buffer)

    def _too_large(self, declared: int | None) -> _Refusal:
        size = f"of {declared} bytes " if declared is not None else ""
        return _Refusal(413, f"the request body {size}is larger than this server takes, {self.options.max_body_bytes} "
                             "bytes (--max-body-bytes)", "request_too_large")

    def _check_head(self, scope) -> None:
        options = self.options
        url = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
        if url > options.max_header_bytes:
            raise _Refusal(414, f"the URL is longer than {options.max_header_bytes} bytes (--max-header-bytes)", "uri_too_long")
        headers = scope.get("headers", [])
        if len(headers) > options.max_headers:
            raise _Refusal(431, f"{len(headers)} header fields; this server takes at most {options.max_headers} "
                                "(--max-headers)", "request_header_fields_too_large")
        if url + sum(len(n) + len(v) for n, v in headers) > options.max_header_bytes:
            raise _Refusal(431, f"the URL and header fields are longer than {options.max_header_bytes} bytes "
                                "(--max-header-bytes)", "request_header_fields_too_large")

    def _check_key(self, scope) -> None:
        if not self._digests or _route_path(scope) in self._open:
            return
        values = [v for n, v in scope.get("headers", []) if n == b"authorization"]
        parts = values[0].split(None, 1) if len(values) == 1 else []  # two Authorization headers: ambiguous, refused
        scheme, token = (parts[0], parts[1].strip()) if len(parts) == 2 else (b"", b"")
        if scheme.lower() != b"bearer" or not token:
            raise _Refusal(401, "this server needs an API key: send it as the header 'Authorization: Bearer KEY'",
                           "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
        presented = hashlib.sha256(token).digest()
        match = False
        for digest in self._digests:  # every key, whichever matches: the time does not say which one did
            match |= hmac.compare_digest(presented, digest)
        if not match:
            raise _Refusal(401, "the API key is not valid for this server", "invalid_api_key",
                           ((b"www-authenticate", b'Bearer error="invalid_token"'),))

    async def _refuse(self, send, refusal: _Refusal, close: bool = False) -> None:
        self.on_reject(refusal.status)
        body = _error_body(refusal.message, refusal.code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *refusal.headers]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    return next((v for n, v in scope.get("headers", []) if n == name), None)


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:  # uvicorn refuses such a request itself; in other servers the body is counted instead
        return None


def _has_body(scope) -> bool:
    return bool(_content_length(scope)) or _header(scope, b"transfer-encoding") is not None


class _deadline:
    """`async with _deadline(seconds)`: TimeoutError once they have passed (asyncio.timeout before Python 3.11)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def __aenter__(self):
        if hasattr(asyncio, "timeout"):
            self._inner = asyncio.timeout(self.seconds)
            return await self._inner.__aenter__()
        task = asyncio.current_task()
        self._expired = False

        def expire():
            self._expired = True
            task.cancel()
        self._handle = asyncio.get_running_loop().call_later(self.seconds, expire)

    async def __aexit__(self, kind, error, traceback):
        if hasattr(self, "_inner"):
            return await self._inner.__aexit__(kind, error, traceback)
        self._handle.cancel()
        if self._expired and kind is asyncio.CancelledError:
            raise TimeoutError from None
        return None


# ---- the HTTP protocol --------------------------------------------------------------------------------

def uvicorn_settings(options: GuardOptions) -> dict:
    """uvicorn.Config keywords that bound the request head: its bytes, header count and time to arrive."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # h11: the head within h11_max_incomplete_event_size (a 400 past it); no count, no deadline
        return {"http": "h11", "h11_max_incomplete_event_size": options.max_header_bytes + HEAD_FRAMING_SLACK}
    return {"http": bounded_httptools_protocol(options)}


def bounded_httptools_protocol(options: GuardOptions) -> type:
    """uvicorn's httptools protocol, whose request head has no bound (a header of any size is read into
    memory), with three: the head's bytes (431; 414 for the URL alone), its header count (431), and its
    time to arrive from the connection or its first byte (408, or a silent close for a connection that has
    sent nothing). A request answered before its body has arrived (401, 413) has the rest of the body read
    and dropped, so the client can read the answer, for at most body_timeout: then the connection is closed."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._refusal: tuple[int, str, str] | None = None
            self._closed_by_us = False
            self._in_head, self._head_received = True, 0
            self._url_bytes = self._field_bytes = self._field_count = 0
            self._head_timer = self._linger_timer = None

        # a connection, and each request head, must arrive in time
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def connection_lost(self, exc):
            for timer in (self._head_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._linger_timer = None
            super().connection_lost(exc)

        def data_received(self, data):
            if self._closed_by_us:
                return
            if self._in_head:
                self._head_received += len(data)
            super().data_received(data)
            if not self._closed_by_us and self._in_head and self._head_received > options.max_header_bytes + HEAD_FRAMING_SLACK:
                self._answer_and_close(431, f"the request head is longer than {options.max_header_bytes} bytes "
                                            "(--max-header-bytes)", "request_header_fields_too_large")

        def on_message_begin(self):
            super().on_message_begin()
            self._in_head = True
            self._url_bytes = self._field_bytes = self._field_count = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def on_url(self, url):
            self._url_bytes += len(url)
            if self._url_bytes > options.max_header_bytes:
                self._stop(414, f"the URL is longer than {options.max_header_bytes} bytes (--max-header-bytes)", "uri_too_long")
            super().on_url(url)

        def on_header(self, name, value):
            self._field_count += 1
            self._field_bytes += len(name) + len(value)
            if self._field_count > options.max_headers:
                self._stop(431, f"more than {options.max_headers} header fields (--max-headers)", "request_header_fields_too_large")
            if self._url_bytes + self._field_bytes > options.max_header_bytes:
                self._stop(431, f"the URL and header fields are longer than {options.max_header_bytes} bytes "
                                "(--max-header-bytes)", "request_header_fields_too_large")
            super().on_header(name, value)

        def on_headers_complete(self):
            self._in_head, self._head_received = False, 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().on_headers_complete()

        def on_message_complete(self):
            super().on_message_complete()
            self._in_head, self._head_received = True, 0
            if self._linger_timer is not None:  # the body of an answered request is over: the connection goes on
                self._linger_timer.cancel()
                self._linger_timer = None
                # and waits for a next request, which uvicorn's keep-alive timer (cancelled by the body's bytes) no
                # longer bounds
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def on_response_complete(self):
            super().on_response_complete()
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                # answered before its body had all arrived (401, 413): uvicorn reads and drops the rest, for so long
                self._linger_timer = self.loop.call_later(options.body_timeout, self._linger_over)

        def _stop(self, status: int, message: str, code: str):
            # raised from a parser callback: httptools stops and uvicorn calls send_400_response, which answers this
            self._refusal = (status, message, code)
            raise ValueError(message)

        def send_400_response(self, msg: str):
            if self._refusal is None:
                return super().send_400_response(msg)
            self._answer_and_close(*self._refusal)

        def _head_timed_out(self):
            self._head_timer = None
            if self._closed_by_us or self.transport is None or self.transport.is_closing() or not self._in_head:
                return
            if self._head_received:  # part of a head: say why; a connection that sent nothing is just closed
                self._answer_and_close(408, f"the request head did not arrive within {options.header_timeout:g} s "
                                            "(--header-timeout)", "request_timeout")
            else:
                self._closed_by_us = True
                self.transport.close()

        def _linger_over(self):
            self._linger_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _answer_and_close(self, status: int, message: str, code: str):
            self._closed_by_us = True
            if self.transport.is_closing():
                return
            body = _error_body(message, code)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n", body]
            self.transport.write(b"".join(head))
            self.transport.close()

    return BoundedHttpToolsProtocol
