"""Request bodies as strict JSON: every failure a 400 saying why, never a RecursionError or a later
UnicodeEncodeError.

`parse_json` refuses text that is not UTF-8, nesting past a depth (found before parsing by a linear
numpy scan that does not recurse), NaN and Infinity, floats out of range, duplicate keys and lone
surrogates; `check_prompt_count` bounds the prompts of one request.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .protocol import APIError

MAX_JSON_DEPTH = 32

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
