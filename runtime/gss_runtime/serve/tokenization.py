"""vLLM's tokenizer endpoints over the model's vocabulary: /tokenize, /detokenize, /tokenizer_info.

With these, clients such as lm-evaluation-harness (`tokenizer_backend=auto` or `remote`) count and
split tokens through the server instead of fetching a tokenizer from a model hub. A model without a
text mapping answers 400 saying so.
"""
from __future__ import annotations

from ..vocabulary import NoTextMapping, Vocabulary
from .protocol import APIError, DetokenizeRequest, TokenizeRequest


def _no_text(e: NoTextMapping, param: str | None) -> APIError:
    return APIError(400, str(e), param=param, code="no_text_mapping")


def tokenize(body: TokenizeRequest, config: dict, vocab: Vocabulary) -> dict:
    """{count, max_model_len, tokens[, token_strs]}; add_special_tokens: what the tokenizer's post-processor
    adds (bytes have none)."""
    try:
        tokens = vocab.encode(body.prompt, body.add_special_tokens)
    except NoTextMapping as e:
        raise _no_text(e, "prompt") from None
    out = {"count": len(tokens), "max_model_len": config["max_seq_len"], "tokens": tokens}
    if body.return_token_strs:
        out["token_strs"] = [vocab.piece(t) for t in tokens]
    return out


def detokenize(body: DetokenizeRequest, config: dict, vocab: Vocabulary) -> dict:
    """{prompt}: the ids' text (bytes as UTF-8, an invalid one as U+FFFD)."""
    bad = next((t for t in body.tokens if not 0 <= t < vocab.size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range [0, {vocab.size})", param="tokens")
    if not vocab.text:
        raise _no_text(NoTextMapping(f"this model's tokens are not bytes (num_tokens {vocab.size}) and it has no "
                                     "tokenizer: there is no text for its ids"), "tokens")
    return {"prompt": vocab.decode(body.tokens)}


def info(config: dict, vocab: Vocabulary, eos_id: int | None) -> dict:
    """What a client needs to tokenize as the server does: the special tokens, the vocabulary size and
    how text maps to ids."""
    if not vocab.text:
        raise _no_text(NoTextMapping(f"this model's tokens are not bytes (num_tokens {vocab.size}) and it has no "
                                     "tokenizer: it takes and gives token ids only"), None)
    files = getattr(vocab, "files", None)
    if files is not None:  # the export's Hugging Face tokenizer
        out = {"tokenizer_class": "PreTrainedTokenizerFast", "text_to_ids": "the export's tokenizer.json",
               "vocab_size": files.vocab_size, "max_model_len": config["max_seq_len"],
               "chat_template": files.chat_template}
        for name, (text, token) in files.special.items():
            out[f"{name}_token"] = text
        out["eos_token"], out["eos_token_id"] = vocab.eos_token(eos_id), eos_id
        return out
    return {"tokenizer_class": "ByteLevel", "text_to_ids": "utf-8 bytes: each byte of the text's UTF-8 is one token id",
            "vocab_size": vocab.size, "max_model_len": config["max_seq_len"], "eos_token": vocab.eos_token(eos_id),
            "eos_token_id": eos_id, "bos_token": None, "pad_token": None, "unk_token": None}
