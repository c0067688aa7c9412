"""Log-probabilities of tokens under the model's own distribution (before temperature, top-k or top-p).

What scoring needs: the log-probability of each given token, and the `top` most likely tokens at
each position, from a (positions, vocab) block of logits. Computed in float64 from the float32
logits, so a token's value is the same number wherever it appears (its own entry, or the top list).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

MAX_TOP = 20  # as OpenAI and vLLM: the widest top list a request may ask for


class TokenLogprob(NamedTuple):
    """One position: the token there, its log-probability, and the `top` most likely tokens (most likely first).
    A tuple: a scored 2,000-token prompt makes 2,000 of them."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: np.ndarray, tokens, top: int = 0) -> list[TokenLogprob]:
    """logits (n, vocab) and the token at each of the n positions -> n TokenLogprobs.

    top: how many of the most likely tokens to list per position (0: none); ties keep the lower id first.
    """
    if len(logits) == 0:
        return []
    # log p = logit - logsumexp(logits): one pass for the normaliser, then only the values read are shifted
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1))
    tokens = np.asarray(tokens, np.int64)
    chosen = x[np.arange(len(tokens)), tokens] - lse
    if top <= 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens.tolist(), chosen.tolist())]
    top = min(top, x.shape[-1])
    if top == 1:
        ids = x.argmax(axis=-1)[:, None]  # the first of equal maxima: the lowest id, as below
    else:  # the best `top` by partition, then sorted: descending value, ascending id on ties
        part = np.argpartition(-x, top - 1, axis=-1)[:, :top]
        order = np.lexsort((part, -np.take_along_axis(x, part, axis=-1)), axis=-1)
        ids = np.take_along_axis(part, order, axis=-1)
    values = np.take_along_axis(x, ids, axis=-1) - lse[:, None]
    return [TokenLogprob(t, v, tuple(zip(i, vs)))
            for t, v, i, vs in zip(tokens.tolist(), chosen.tolist(), ids.tolist(), values.tolist())]
