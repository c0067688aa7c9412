"""OpenAI's completions request, checked against the model, and its error object; vLLM's tokenizer requests.

Fields are OpenAI's, plus vLLM's extras `top_k`, `stop_token_ids` and `ignore_eos`. Types are
strict (a string is not a number) and unknown fields are refused, so a typo in a field name is an
error rather than a silently ignored option. Fields OpenAI has but this server cannot honour are
accepted at their neutral value only.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict

from ..errors import RuntimeInputError
from ..generate import Sampling
from ..logprobs import MAX_TOP
from ..vocabulary import Vocabulary
from .engine import Completion

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_SAMPLES = 32  # n and best_of: samples of one prompt (each a row of the running batch)
SEED_RANGE = 2**63
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop strings: each is searched for in the text after every token


class APIError(Exception):
    """An answer other than 200, as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """What a completion and a chat completion request share: sampling, streaming and stopping."""

    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # OpenAI's, honoured at their neutral values only
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM's extras
    top_k: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = False


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS
    # OpenAI's, honoured at their neutral values only
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize (the completions form): text in, ids out."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """vLLM's POST /detokenize: ids in, text out."""

    model: Optional[str] = None
    tokens: list[int]


def _bad(message: str, param: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _unsupported(request: CompletionRequest) -> None:
    neutral = {"presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0), "suffix": (None, ""),
               "logit_bias": (None, {})}
    for name, allowed in neutral.items():
        if getattr(request, name) not in allowed:
            raise _bad(f"{name} is not supported by this server (leave it out)", name, "unsupported_parameter")


def samples_of(request: CompletionRequest) -> tuple[int, int]:
    """(n, best_of): completions returned per prompt, and samples drawn per prompt to pick them from."""
    n = 1 if request.n is None else request.n
    best_of = n if request.best_of is None else request.best_of
    if not 1 <= n <= MAX_SAMPLES:
        raise _bad(f"n must be in [1, {MAX_SAMPLES}], got {n}", "n")
    if not n <= best_of <= MAX_SAMPLES:
        raise _bad(f"best_of must be in [n, {MAX_SAMPLES}] (n is {n}), got {best_of}", "best_of")
    if request.stream and best_of > n:
        raise _bad("best_of larger than n cannot be streamed: the best samples are known only at the end", "best_of")
    return n, best_of


def sample_seed(seed: int | None, sample: int) -> int | None:
    """Sample j of a prompt draws as a request with seed + j would alone (modulo 2^63); no seed: its own random one."""
    return None if seed is None else (seed + sample) % SEED_RANGE


def prompts_of(request: CompletionRequest, config: dict, vocabulary: Vocabulary | None = None) -> list[list[int]]:
    """The request's prompts as token ids, each checked: text for a model with a tokenizer or byte-level, ids for any."""
    prompt, vocab, limit = request.prompt, config["num_tokens"], config["max_seq_len"]
    vocabulary = vocabulary or Vocabulary(vocab)
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise _bad("prompt is empty: give a string, a list of token ids, or a list of either", "prompt")
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not vocabulary.text:
                raise _bad(f"this model has no tokenizer and its tokens are not bytes (num_tokens {vocab}): give {where} "
                           "as a list of token ids", "prompt", "no_text_mapping")
            if vocabulary.kind == "bytes" and len(item) > limit:  # a character is at least one byte: refused before encoding
                raise _bad(f"{where} has at least {len(item)} tokens; this model's max_seq_len is {limit}", "prompt",
                           "context_length_exceeded")
            ids = vocabulary.encode(item)  # a tokenizer's is bounded by the body's size limit
        else:
            ids = list(item)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise _bad(f"token id {bad} in {where} is out of range [0, {vocab})", "prompt")
        if not ids:
            raise _bad(f"{where} is empty: give at least one token", "prompt")
        if len(ids) > limit:
            raise _bad(f"{where} has {len(ids)} tokens; this model's max_seq_len is {limit}", "prompt", "context_length_exceeded")
        out.append(ids)
    return out


def completions_of(request: CompletionRequest, config: dict, eos_id: int | None,
                   vocabulary: Vocabulary | None = None) -> list[Completion]:
    """One engine Completion per sample (best_of per prompt, prompt by prompt), or APIError(400) naming the
    first bad field."""
    _unsupported(request)
    vocab = config["num_tokens"]
    vocabulary = vocabulary or Vocabulary(vocab)
    max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not request.echo):
        raise _bad(f"max_tokens must be at least 1 (0 only with echo, to score the prompt), got {max_tokens}", "max_tokens")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP:
        raise _bad(f"logprobs must be in [0, {MAX_TOP}], got {request.logprobs}", "logprobs")
    n, best_of = samples_of(request)
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise _bad(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    top_k = request.top_k
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be -1 or 0 (off) or a positive integer, got {top_k}", "top_k")
    if request.seed is not None and not 0 <= request.seed < SEED_RANGE:
        raise _bad(f"seed must be in [0, 2^63), got {request.seed}", "seed")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", "stop")
    if stops and not vocabulary.text:
        raise _bad(f"this model has no tokenizer and its tokens are not bytes (num_tokens {vocab}): there is no text "
                   "to stop at; use stop_token_ids", "stop", "no_text_mapping")
    stop_ids = list(request.stop_token_ids or [])
    bad = next((t for t in stop_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad(f"stop token id {bad} is out of range [0, {vocab})", "stop_token_ids")
    sampling = Sampling(temperature=temperature, top_k=top_k if top_k and top_k > 0 else None, top_p=request.top_p)
    try:
        sampling.check(vocab)  # what the runtime itself refuses never reaches the step loop
    except RuntimeInputError as e:
        raise _bad(str(e), "temperature") from None
    # a stop id is a one-token stop sequence: it ends the request and is not shown. A byte-level model's stop
    # strings are byte sequences (exact); a tokenizer's are found in the decoded text
    byte_stops = vocabulary.kind == "bytes"
    sequences = [list(s.encode("utf-8")) for s in stops if s and byte_stops] + [[t] for t in stop_ids]
    texts = tuple(s for s in stops if s) if not byte_stops else ()
    eos = None if request.ignore_eos else eos_id
    # per prompt, best_of samples in order, sample j seeded by sample_seed(seed, j)
    return [Completion(p, max_tokens, sampling, sample_seed(request.seed, j), sequences, eos, request.logprobs,
                       bool(request.echo), best_of > n, texts, vocabulary if texts else None)
            for p in prompts_of(request, config, vocabulary) for j in range(best_of)]


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's request validation errors as one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    # a union's errors name the member type tried ("str", "list[int]"): the field's name is what users need
    members = {"str", "int", "float", "bool", "dict"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in members and "[" not in str(p)]
    if first.get("type") == "json_invalid":
        return _bad(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None)
    param = loc[0] if loc else None
    field_name = ".".join(loc) or "the request body"
    message = first.get("msg", "invalid request")
    if param == "prompt" and any(e.get("input", 0) is None and e.get("type") == "int_type" for e in errors):
        # lm-eval sends its prefix token (a tokenizer's bos or eos) as null when the model has neither
        message = ("prompt holds null where a token id belongs (lm-evaluation-harness does this for a model without "
                   "bos or eos token: give it custom_prefix_token_id)")
    elif param == "prompt" and first.get("type") != "missing":
        message = "prompt must be a string, a list of token ids, or a list of either"
    elif param == "stop":
        message = "stop must be a string or a list of strings"
    elif not loc and first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object"
    elif first.get("type") == "missing":
        message = f"{field_name} is required"
    elif first.get("type") == "extra_forbidden":
        message = f"unknown field {field_name}"
    else:
        message = f"{field_name}: {message}"
    return _bad(message, param)
