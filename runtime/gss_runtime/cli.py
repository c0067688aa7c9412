"""`gss-run`: generate from an exported model (or show its next-token odds), without torch.

Its arguments are parsed by the standard library's argparse and its output is plain text, so the
`gss-runtime` distribution installs numpy and onnxruntime only.
"""
from __future__ import annotations

import argparse
import codecs
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from .cli_support import Interrupted, guarded
from .errors import RuntimeInputError
from .generate import Generator, Sampling
from .runner import GSSRunner, check_ids

BYTE_VOCAB = 256


PROVIDERS = ("auto", "cpu", "cuda")


def byte_text(token: int) -> str:
    """A byte token shown readably: the character if printable ASCII, else an escape like \\n or \\x00."""
    return repr(bytes([token]))[2:-1]


def parse_prompt(prompt: Optional[str], prompt_ids: Optional[str], what: str = "the prompt") -> list[int]:
    """Exactly one of --prompt (text -> its UTF-8 bytes) or --prompt-ids ("1,2,3") -> token ids."""
    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt is not None:
        # surrogateescape: bytes of the command line that are not UTF-8 come back as they were given
        ids = list(prompt.encode("utf-8", errors="surrogateescape"))
    else:
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise RuntimeInputError(f"{'--prompt-ids' if what == 'the prompt' else what} must be comma-separated integers, got {prompt_ids!r}") from None
    if not ids:
        raise RuntimeInputError(f"{what} is empty: give at least one token")
    return ids


def load(model: Path, provider: str, threads: Optional[int], text_prompt: bool) -> GSSRunner:
    """The full-sequence runner, refusing a text prompt for a model whose tokens are not bytes."""
    runner = GSSRunner(model, provider=provider, threads=threads)
    _check_text_prompt(runner.config["num_tokens"], text_prompt)
    return runner


def _stop_sequences(stops: list[str], byte_level: bool) -> list[list[int]]:
    """--stop values: text (byte-level models) or comma-separated ids (`ids:1,2`)."""
    out = []
    for stop in stops:
        if stop.startswith("ids:"):
            out.append(parse_prompt(None, stop[4:], f"--stop {stop!r}"))
        elif byte_level:
            out.append(list(stop.encode("utf-8", errors="surrogateescape")))
        else:
            raise RuntimeInputError(f"--stop {stop!r}: text stop sequences need a byte-level model; give ids as ids:1,2")
    return out


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _number(text: str) -> float:
    """An argparse type: a finite number (float() also reads nan and inf, which no option means)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gss-run", description="Generate from a prompt with the decoder with state (one position per token), "
        "or show next-token odds.")
    p.add_argument("model", type=Path, help="folder written by gss-export (model.onnx, decoder.onnx, prefill.onnx, config.json)")
    p.add_argument("--prompt", metavar="TEXT", help="text, fed as UTF-8 bytes (byte-level models, num_tokens 256)")
    p.add_argument("--prompt-ids", metavar="IDS", help="token ids, comma-separated, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", metavar="N", type=_count(0), default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", metavar="T", type=_non_negative, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", metavar="K", type=_count(1), help="sample among the k most likely tokens")
    p.add_argument("--filter-thres", metavar="THRES", type=_number, help="upstream's top-k: k = int((1 - thres) * vocab)")
    p.add_argument("--top-p", metavar="P", type=_number, help="sample among the most likely tokens holding this much probability")
    p.add_argument("--seed", metavar="S", type=_count(0), help="makes sampling reproducible")
    p.add_argument("--eos-id", metavar="ID", type=_count(0), help="stop when this token is generated (not printed)")
    p.add_argument("--stop", metavar="TEXT", action="append", default=[], help="stop sequence, not printed (repeatable): text, or ids:1,2")
    p.add_argument("--on-limit", metavar="stop|slide", default="stop", help="at max_seq_len: stop (default), or slide (a window, like upstream)")
    p.add_argument("--next", dest="next_tokens", metavar="N", type=_count(1), help="instead of generating, show the N most likely next tokens")
    p.add_argument("--provider", choices=PROVIDERS, default="auto", help="auto (default): CUDA when it really works, else CPU")
    p.add_argument("--threads", metavar="N", type=_count(1), help="onnxruntime intra-op threads")
    p.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object instead of streaming text")
    return p


def run(
    model: Path,
    prompt: Optional[str] = None,
    prompt_ids: Optional[str] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    filter_thres: Optional[float] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    stop: tuple[str, ...] = (),
    on_limit: str = "stop",
    next_tokens: Optional[int] = None,
    provider: str = "auto",
    threads: Optional[int] = None,
    json_output: bool = False,
) -> None:
    """Generate from a prompt with the decoder with state (one position per token), or show next-token odds."""
    ids = parse_prompt(prompt, prompt_ids)  # before loading the model: fails fast on a typo
    if next_tokens is not None:
        return _show_next(model, ids, next_tokens, provider, threads, prompt is not None, json_output)
    generator = Generator(model, provider=provider, threads=threads)
    _check_text_prompt(generator.config["num_tokens"], prompt is not None)
    byte_level = generator.config["num_tokens"] == BYTE_VOCAB
    # every check before anything is printed (the generator checks its options only once it starts)
    generator.decoder.check_prompt(ids)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, filter_thres=filter_thres)
    sampling.check(generator.config["num_tokens"])
    if eos_id is not None and eos_id >= generator.config["num_tokens"]:
        raise RuntimeInputError(f"eos id {eos_id} is out of range [0, {generator.config['num_tokens']})")
    if on_limit not in ("stop", "slide"):
        raise RuntimeInputError(f"on_limit must be 'stop' or 'slide', got {on_limit!r}")
    options = dict(sampling=sampling, seed=seed, eos_id=eos_id, stop_sequences=_stop_sequences(stop, byte_level), on_limit=on_limit)
    if json_output:
        result = generator.generate(ids, max_new_tokens, **options)
        made = result.tokens[0]
        print(json.dumps({
            "family": generator.config["family"],
            "prompt_ids": ids,
            "tokens": made,
            "text": bytes(made).decode("utf-8", errors="replace") if byte_level else None,
            "stop_reason": result.stop_reasons[0],
            "provider": generator.decoder.providers[0],
            "timings": {
                "prefill_seconds": round(result.prefill_seconds, 6),
                "decode_seconds": round(result.decode_seconds, 6),
                "tokens_per_second": round(result.tokens_per_second, 2) if made else None,
            },
            "state_bytes": result.state_bytes,
        }))
        return
    # stream: bytes become text as soon as they form whole UTF-8 characters; invalid ones become U+FFFD
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(bytes(ids).decode("utf-8", errors="replace") if byte_level else " ".join(map(str, ids)))
    sys.stdout.flush()

    made = []

    def show(_row: int, token: int) -> None:
        made.append(token)
        sys.stdout.write(decoder.decode(bytes([token])) if byte_level else f" {token}")
        sys.stdout.flush()

    try:
        result = generator.generate(ids, max_new_tokens, on_token=show, **options)
    except Interrupted as e:  # end the line of text, then say how far it got
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise Interrupted(e.signum, f"interrupted by {e.signal_name} after {len(made)} tokens") from None
    sys.stdout.write((decoder.decode(b"", final=True) if byte_level else "") + "\n")
    sys.stderr.write(
        f"{len(result.tokens[0])} tokens, stopped by {result.stop_reasons[0]}; prefill {result.prefill_seconds * 1e3:.1f} ms, "
        f"{result.tokens_per_second:.1f} tokens/s, {generator.decoder.providers[0]}\n"
    )


def _check_text_prompt(num_tokens: int, text_prompt: bool) -> None:
    if text_prompt and num_tokens != BYTE_VOCAB:
        raise RuntimeInputError(
            f"--prompt encodes text as UTF-8 bytes, which needs a byte-level model (num_tokens {BYTE_VOCAB}); "
            f"this model has num_tokens {num_tokens}: use --prompt-ids"
        )


def _show_next(model: Path, ids: list[int], top: int, provider: str, threads: Optional[int], text_prompt: bool, json_output: bool) -> None:
    """The `top` most likely next tokens after the prompt, from the full-sequence model."""
    runner = load(model, provider, threads, text_prompt)
    start = time.perf_counter()
    nxt = runner.next_token_distribution(ids, top=min(top, runner.config["num_tokens"]))
    seconds = time.perf_counter() - start
    byte_level = runner.config["num_tokens"] == BYTE_VOCAB
    if json_output:
        print(json.dumps({
            "prompt_ids": ids,
            "next": [{"id": i, "prob": p, "text": byte_text(i) if byte_level else None} for i, p in nxt],
            "provider": runner.providers[0],
            "seconds": round(seconds, 6),
        }))
        return
    _print_table(nxt, byte_level, f"next token after {len(ids)} prompt tokens")
    print(f"{runner.providers[0]}, {seconds * 1000:.1f} ms")


def _print_table(nxt: list[tuple[int, float]], byte_level: bool, title: str) -> None:
    """The next-token table as plain text: a title, the column names, one row per token with cells between │."""
    header = ["rank", "token id", "probability"] + (["byte"] if byte_level else [])
    rows = [[str(rank), str(token), f"{prob:.4f}"] + ([f"'{byte_text(token)}'"] if byte_level else [])
            for rank, (token, prob) in enumerate(nxt, 1)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str], sep: str = "│") -> str:  # bytes left-aligned, numbers right-aligned
        padded = [c.ljust(w) if name == "byte" else c.rjust(w) for c, w, name in zip(cells, widths, header)]
        return f"{sep} " + f" {sep} ".join(padded) + f" {sep}"

    print("\n".join([title, line(header, " "), *map(line, rows)]))


def main() -> None:
    args = parser().parse_args()  # a bad command line prints the usage and its error, and exits 2
    guarded(lambda: run(**vars(args)), (RuntimeInputError,), "GSS_RUN_DEBUG")


if __name__ == "__main__":
    main()
