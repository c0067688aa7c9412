"""OpenAI's chat completions over a model whose tokenizer has a chat template.

The conversation is rendered as Hugging Face renders it: the template from tokenizer_config.json,
in a sandboxed jinja2 environment that trims blocks and strips leading spaces, given `messages`,
`add_generation_prompt` and the tokenizer's special tokens. The text is encoded without adding
special tokens (the template writes its own) and runs as a completion; its events become chat
objects (`chat.completion`, `chat.completion.chunk` with `delta`s, log-probabilities as
`{"content": [{token, logprob, bytes, top_logprobs}]}`).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Literal, Optional, Union

from ..logprobs import MAX_TOP
from ..vocabulary import Vocabulary
from .completions import FLOOR, Reply
from .protocol import APIError, CompletionRequest, SamplingFields, _Strict

MAX_MESSAGES = 1024  # messages in one conversation; their text is bounded by the body's size limit


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """A message; fields other than role, content and name (tool calls and the like) are refused."""

    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True  # vLLM's extra


def _raise(message: str):
    raise ValueError(message)  # what a template's raise_exception() does: the caller answers 400


@lru_cache(maxsize=4)
def _compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise APIError(400, f"this model's chat_template does not compile: {e}", param="messages",
                       code="invalid_chat_template") from None


def render(vocab: Vocabulary, request: ChatCompletionRequest) -> str:
    """The conversation as the model's chat template writes it; 400 when there is no template or it refuses."""
    files = getattr(vocab, "files", None)
    if files is None or files.chat_template is None:
        why = "its tokenizer_config.json has no chat_template" if files is not None else "it has no tokenizer"
        raise APIError(400, f"this model cannot chat: {why}. Use /v1/completions with your own prompt format, or "
                            "re-export it with gss-export --tokenizer FOLDER whose tokenizer_config.json has a chat_template",
                       param="messages", code="no_chat_template")
    if not request.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    if len(request.messages) > MAX_MESSAGES:
        raise APIError(400, f"{len(request.messages)} messages; this server takes at most {MAX_MESSAGES}", param="messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name is not None else {})}
                for m in request.messages]
    special = {f"{name}_token": text for name, (text, _) in files.special.items()}
    try:
        return _compiled(files.chat_template).render(messages=messages, add_generation_prompt=request.add_generation_prompt,
                                                      **special)
    except APIError:
        raise
    except Exception as e:  # the template's own raise_exception, or an error in it: the request cannot be rendered
        raise APIError(400, f"this model's chat template refused the messages: {e}", param="messages",
                       code="invalid_chat_template") from None


def as_completion(request: ChatCompletionRequest, prompt: list[int], config: dict, bounded: bool) -> CompletionRequest:
    """The completion request that runs the chat: its fields, with the rendered conversation's ids as the prompt.

    max_tokens by default: what is left of max_seq_len after the prompt (a recurrent model: max_seq_len)."""
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP}], got {request.top_logprobs}", param="top_logprobs")
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if limit is None:
        limit = max(1, config["max_seq_len"] - len(prompt)) if bounded else config["max_seq_len"]
    fields = request.model_dump(exclude={"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                                         "add_generation_prompt", "stream_options"})
    return CompletionRequest.model_construct(
        **fields, prompt=prompt, max_tokens=limit, stream_options=request.stream_options,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        echo=False, best_of=None, suffix=None)


def _token(vocab: Vocabulary, piece: str) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes, from the piece the completion's log-probabilities name it by."""
    tokenizer = getattr(vocab, "tokenizer", None)
    if tokenizer is not None:
        token = tokenizer.token_to_id(piece)
        raw = tokenizer.decode([token], skip_special_tokens=False) if token is not None else piece
        return raw, list(raw.encode("utf-8"))
    if piece.startswith("bytes:\\x"):
        value = int(piece[len("bytes:\\x"):], 16)
        return piece, [value]
    return piece, list(piece.encode("utf-8"))


class ChatReply(Reply):
    """A completion Reply whose objects are OpenAI's chat objects; `top`: top_logprobs asked for."""

    def __init__(self, *args, streaming: bool, top: int = 0, **kwargs):
        self.streaming, self.top, self.started = streaming, top, set()
        super().__init__(*args, **kwargs)
        self.id = "chatcmpl-" + self.id[len("cmpl-"):]
        self._head = json.dumps(self.envelope([]), separators=(",", ":"))[: -len("[]}")]

    def envelope(self, choices: list[dict], **extra) -> dict:
        kind = "chat.completion.chunk" if getattr(self, "streaming", False) else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def _logprobs(self, body: dict | None) -> dict | None:
        if body is None:
            return None
        vocab = self.choices[0].vocab
        content = []
        for piece, logprob, top in zip(body["tokens"], body["token_logprobs"], body["top_logprobs"]):
            text, raw = _token(vocab, piece)
            ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])[: self.top]
            content.append({"token": text, "logprob": logprob if logprob is not None else FLOOR, "bytes": raw,
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": b}
                                             for (p, v) in ranked for t, b in [_token(vocab, p)]]})
        return {"content": content}

    def best(self) -> list[dict]:
        out = []
        for body in super().best():
            out.append({"index": body["index"], "message": {"role": "assistant", "content": body["text"]},
                        "logprobs": self._logprobs(body["logprobs"]), "finish_reason": body["finish_reason"]})
        return out

    def chunk(self, index: int, text: str, ids: list[int], logprobs: dict | None, reason: str | None,
              usage_field: bool) -> str:
        delta: dict = {"content": text} if text or index not in self.started else {}
        if index not in self.started:  # a choice's first chunk says who speaks
            self.started.add(index)
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": reason}
        tail = ',"usage":null}' if usage_field else "}"
        return f"data: {self._head}[{json.dumps(choice, separators=(',', ':'))}]{tail}\n\n"


def chat_reply(model: str, vocab: Vocabulary, prompts: list[list[int]], n: int, request: ChatCompletionRequest,
               stops: tuple[str, ...]) -> ChatReply:
    return ChatReply(model, vocab, prompts, n, n, bool(request.logprobs), stops, streaming=bool(request.stream),
                     top=request.top_logprobs or 0)

