"""What gss-serve checks before a request reaches a route: API keys, and bounds on every part of a request.

- `Guard`, pure ASGI middleware around the whole application (so a route added later is covered without
  naming it): the request head's size (431, 414), `Authorization: Bearer KEY` on every path but
  /health (and /metrics with `public_metrics`; 401), then the body, read whole under a size limit (413,
  as soon as it is passed) and a deadline (408), and handed on to the app. Streams are untouched: the
  middleware wraps `receive` only until the body has been read, and never `send`.
- `GuardOptions`: the keys and limits, read from the options by `guard_options`.

The body's JSON is checked by `strict_json`, the request head by `http_limits` (uvicorn's protocol).
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import RuntimeInputError
from .strict_json import MAX_JSON_DEPTH

API_KEY_ENV = "GSS_API_KEY"
OPEN_PATHS = ("/health",)  # answered without a key; /metrics too with public_metrics

# defaults (docs/serving.md, "Running in production", says why each)
MAX_BODY_BYTES = 4 * 2**20
BODY_TIMEOUT = 30.0
HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 32 * 2**10
MAX_HEADERS = 100
MAX_PROMPTS = 256
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


def _route_path(scope: dict) -> str:
    """The path as the router matches it (less the root path a proxy mounts the app under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
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
        body = error_body(refusal.message, refusal.code)
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
