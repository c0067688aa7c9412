"""`gss-run`: generate from an exported model (or show its next-token odds), without torch.

Its arguments are parsed by the standard library's argparse and its output is plain text, so the
`gss-runtime` distribution installs numpy, onnxruntime and tokenizers only (OpenVINO is an extra).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from .cli_support import Interrupted, guarded
from .errors import RuntimeInputError
from .generate import Generation, Generator, Sampling
from .backends import BACKENDS, PRECISIONS, PROVIDERS
from .runner import GSSRunner, check_ids
from .tokenizer import vocabulary_for
from .vocabulary import NoTextMapping, Vocabulary

BYTE_VOCAB = 256



def byte_text(token: int) -> str:
    """A byte token shown readably: the character if printable ASCII, else an escape like \\n or \\x00."""
    return repr(bytes([token]))[2:-1]


def parse_prompt(prompt: Optional[str], prompt_ids: Optional[str], what: str = "the prompt",
                 vocab: Vocabulary | None = None) -> list[int]:
    """Exactly one of --prompt (text -> ids through `vocab`: UTF-8 bytes when it is None or byte-level,
    else the model's tokenizer) or --prompt-ids ("1,2,3") -> token ids."""
    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt is not None and vocab is not None and vocab.kind != "bytes":
        ids = _encode(vocab, prompt, "--prompt")
    elif prompt is not None:
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


def _encode(vocab: Vocabulary, text: str, flag: str) -> list[int]:
    try:
        return vocab.encode(text)
    except NoTextMapping as e:
        raise RuntimeInputError(f"{flag} takes text, but {e} (export it with gss-export --tokenizer to give it one); "
                                "use --prompt-ids") from None


def _stops(stops: list[str], vocab: Vocabulary) -> tuple[list[list[int]], list[str]]:
    """--stop values -> (id sequences, stop strings): `ids:1,2` is ids; text is bytes for a byte-level
    model (exact), and a stop string matched in the decoded text for a model with a tokenizer (its
    tokens need not line up with the string's)."""
    ids, texts = [], []
    for stop in stops:
        if stop.startswith("ids:"):
            ids.append(parse_prompt(None, stop[4:], f"--stop {stop!r}"))
        elif vocab.kind == "bytes":
            ids.append(list(stop.encode("utf-8", errors="surrogateescape")))
        elif vocab.text:
            texts.append(stop)
        else:
            raise RuntimeInputError(f"--stop {stop!r}: this model has no text (num_tokens {vocab.size}, no tokenizer); "
                                    "give ids as ids:1,2")
    return ids, texts


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
    p.add_argument("--prompt", metavar="TEXT", help="text: through the export's tokenizer, or as UTF-8 bytes for a byte-level model")
    p.add_argument("--prompt-ids", metavar="IDS", help="token ids, comma-separated, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", metavar="N", type=_count(0), default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", metavar="T", type=_non_negative, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", metavar="K", type=_count(1), help="sample among the k most likely tokens")
    p.add_argument("--filter-thres", metavar="THRES", type=_number, help="upstream's top-k: k = int((1 - thres) * vocab)")
    p.add_argument("--top-p", metavar="P", type=_number, help="sample among the most likely tokens holding this much probability")
    p.add_argument("--seed", metavar="S", type=_count(0), help="makes sampling reproducible")
    p.add_argument("--eos-id", metavar="ID", type=_count(0), help="stop when this token is generated (not printed); "
                   "default: the tokenizer's end-of-text token, if the export has a tokenizer")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--stop", metavar="TEXT", action="append", default=[], help="stop sequence, not printed (repeatable): text, or ids:1,2")
    p.add_argument("--on-limit", metavar="stop|slide", default="stop", help="at max_seq_len: stop (default), or slide (a window, like upstream)")
    p.add_argument("--next", dest="next_tokens", metavar="N", type=_count(1), help="instead of generating, show the N most likely next tokens")
    add_backend_options(p)
    p.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object instead of streaming text")
    return p


def add_backend_options(p: argparse.ArgumentParser, per: str = "") -> None:
    """--backend, --provider, --precision and --threads: where the graphs run (gss-run's and gss-serve's)."""
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (default), or openvino (pip install \"gss-runtime[openvino]\")")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="onnxruntime's: auto (default): CUDA when it really works, else CPU")
    p.add_argument("--precision", choices=PRECISIONS, default="f32",
                   help="f32 (default), or bf16 on OpenVINO where the export's bf16 quality check passed (gss-export --openvino)")
    p.add_argument("--threads", metavar="N", type=_count(1), help=f"the backend's intra-op threads{per}")


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
    ignore_eos: bool = False,
    stop: tuple[str, ...] = (),
    on_limit: str = "stop",
    next_tokens: Optional[int] = None,
    provider: str = "auto",
    threads: Optional[int] = None,
    json_output: bool = False,
    backend: str = "onnxruntime",
    precision: str = "f32",
) -> None:
    """Generate from a prompt with the decoder with state (one position per token), or show next-token odds."""
    if prompt_ids is not None or prompt is None:
        parse_prompt(prompt, prompt_ids)  # before loading the model: fails fast on a typo
    if eos_id is not None and ignore_eos:
        raise RuntimeInputError("give --eos-id or --ignore-eos, not both")
    if next_tokens is not None:
        return _show_next(model, prompt, prompt_ids, next_tokens, dict(provider=provider, threads=threads, backend=backend,
                                                                        precision=precision), json_output)
    generator = Generator(model, provider=provider, threads=threads, backend=backend, precision=precision)
    vocab = generator.vocabulary
    ids = parse_prompt(prompt, prompt_ids, vocab=vocab)
    # every check before anything is printed (the generator checks its options only once it starts)
    generator.decoder.check_prompt(ids)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, filter_thres=filter_thres)
    sampling.check(generator.config["num_tokens"])
    if eos_id is not None and eos_id >= generator.config["num_tokens"]:
        raise RuntimeInputError(f"eos id {eos_id} is out of range [0, {generator.config['num_tokens']})")
    if on_limit not in ("stop", "slide"):
        raise RuntimeInputError(f"on_limit must be 'stop' or 'slide', got {on_limit!r}")
    stop_ids, stop_texts = _stops(list(stop), vocab)
    # the end-of-text token: --eos-id, else the tokenizer's (if the export has one)
    eos = None if ignore_eos else eos_id if eos_id is not None else generator.eos_id
    options = dict(sampling=sampling, seed=seed, eos_id=eos, stop_sequences=stop_ids, on_limit=on_limit)
    outcome: list = []
    pieces = generator.stream_text(ids, max_new_tokens, stop=stop_texts, outcome=outcome, **options) if vocab.text \
        else _id_pieces(generator, ids, max_new_tokens, outcome, options)
    if json_output:
        text = "".join(pieces)
        made, reason, result = outcome
        print(json.dumps({
            "family": generator.config["family"],
            "prompt_ids": ids,
            "tokens": made,
            "text": text if vocab.text else None,
            "stop_reason": reason,
            "provider": generator.decoder.providers[0],
            "timings": {
                "prefill_seconds": round(result.prefill_seconds, 6),
                "decode_seconds": round(result.decode_seconds, 6),
                "tokens_per_second": round(result.tokens_per_second, 2) if result.decode_seconds > 0 else None,
            },
            "state_bytes": result.state_bytes,
        }))
        return
    # stream: text as soon as it is final (whole characters, past any stop string it may start)
    sys.stdout.write(prompt if prompt is not None else " ".join(map(str, ids)))
    sys.stdout.flush()
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except Interrupted as e:  # end the line of text, then say how far it got
        pieces.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise Interrupted(e.signum, f"interrupted by {e.signal_name} after {len(outcome[0]) if outcome else 0} tokens") from None
    sys.stdout.write("\n")
    made, reason, result = outcome
    sys.stderr.write(f"{len(made)} tokens, stopped by {reason}; prefill {result.prefill_seconds * 1e3:.1f} ms, "
                     f"{result.tokens_per_second:.1f} tokens/s, {generator.decoder.providers[0]}\n")


def _id_pieces(generator: Generator, ids: list[int], max_new_tokens: int, outcome: list, options: dict):
    """An ids-only model's output as text pieces (' 12 7 301'); `outcome` as Generator.stream_text fills it."""
    result = Generation([[]], [""])
    try:
        for _, token in generator.stream(ids, max_new_tokens, result=result, **options):
            yield f" {token}"
    finally:
        outcome += [result.tokens[0], result.stop_reasons[0], result]


def _show_next(model: Path, prompt: Optional[str], prompt_ids: Optional[str], top: int, where: dict,
               json_output: bool) -> None:
    """The `top` most likely next tokens after the prompt, from the full-sequence model (opened as `where` says)."""
    runner = GSSRunner(model, **where)
    vocab = vocabulary_for(runner.path.parent, runner.config["num_tokens"])
    ids = parse_prompt(prompt, prompt_ids, vocab=vocab)
    start = time.perf_counter()
    nxt = runner.next_token_distribution(ids, top=min(top, runner.config["num_tokens"]))
    seconds = time.perf_counter() - start
    shown = byte_text if vocab.kind == "bytes" else (lambda t: vocab.decode([t])) if vocab.text else None
    if json_output:
        print(json.dumps({
            "prompt_ids": ids,
            "next": [{"id": i, "prob": p, "text": shown(i) if shown else None} for i, p in nxt],
            "provider": runner.providers[0],
            "seconds": round(seconds, 6),
        }))
        return
    column = None if shown is None else ("byte", lambda t: f"'{byte_text(t)}'") if vocab.kind == "bytes" else ("text", lambda t: repr(shown(t)))
    _print_table(nxt, column, f"next token after {len(ids)} prompt tokens")
    print(f"{runner.providers[0]}, {seconds * 1000:.1f} ms")


def _print_table(nxt: list[tuple[int, float]], column, title: str) -> None:
    """The next-token table as plain text: a title, the column names, one row per token with cells between │.
    column: (name, token -> cell) of the tokens' text, or None for a model without text."""
    header = ["rank", "token id", "probability"] + ([column[0]] if column else [])
    rows = [[str(rank), str(token), f"{prob:.4f}"] + ([column[1](token)] if column else [])
            for rank, (token, prob) in enumerate(nxt, 1)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str], sep: str = "│") -> str:  # bytes left-aligned, numbers right-aligned
        padded = [c.ljust(w) if name in ("byte", "text") else c.rjust(w) for c, w, name in zip(cells, widths, header)]
        return f"{sep} " + f" {sep} ".join(padded) + f" {sep}"

    print("\n".join([title, line(header, " "), *map(line, rows)]))


def main() -> None:
    args = parser().parse_args()  # a bad command line prints the usage and its error, and exits 2
    guarded(lambda: run(**vars(args)), (RuntimeInputError,), "GSS_RUN_DEBUG")


if __name__ == "__main__":
    main()
