"""Train a small byte-level language model on Python's bundled pydoc topics (see byte_corpus.py).

Two families, each with its own defaults (FAMILIES below); corpus, split, optimiser, schedule and
checkpoint layout are shared. The result is a real trained checkpoint with upstream key names:
small enough to commit, yet trained enough that export checks (fp16 / int8 agreement on the
held-out split) measure something meaningful instead of random-weight noise.

    python examples/train_byte_lm.py                # GatedDsConvLM -> examples/byte_lm/, ~13 min
    python examples/train_byte_lm.py --family gss   # GatedStateSpacesLM -> examples/byte_gss/, ~2 min

(times on one CPU thread)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shlex
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # byte_corpus, when run as a script
from byte_corpus import corpus_bytes, load_corpus  # noqa: E402

from gss_export.families import GatedDsConvLM, DsConvConfig  # noqa: E402

HERE = Path(__file__).resolve().parent

DSCONV_CONFIG = DsConvConfig(num_tokens=256, dim=128, depth=3, heads=4, dim_dsconv=128,
                             dim_expansion_factor=2, max_seq_len=2048)

# Upstream constructor keywords. dss_kernel_lambda_imag_exp is spelled out: the state dict's
# shapes are the same either way, so only training.json tells a loader which kernel was trained.
GSS_CONFIG = dict(num_tokens=256, dim=128, depth=3, dim_expansion_factor=2,
                  dss_kernel_N=64, dss_kernel_H=128, dss_kernel_lambda_imag_exp=True)


def build_gss() -> torch.nn.Module:
    from gated_state_spaces_pytorch import GatedStateSpacesLM  # upstream's own class
    return GatedStateSpacesLM(**GSS_CONFIG)


# Per family: model builder, defaults, training.json entries before "parameters" (the model)
# and before "command" (extra versions), and notes for --help.
FAMILIES = {
    "dsconv": dict(
        build=lambda: GatedDsConvLM(DSCONV_CONFIG, conv="fft"),
        steps=4500, lr=2e-3, out="byte_lm",
        record=lambda: {"config": DSCONV_CONFIG.to_dict(), "conv": "fft"},
        versions=lambda: {},
        notes="dsconv: gss_export's GatedDsConvLM (upstream key names), through its conv='fft' form. "
              "~13 min (0.17 s/step).",
    ),
    "gss": dict(
        build=build_gss,
        steps=500, lr=4e-3, out="byte_gss",
        record=lambda: {"model": "gated_state_spaces_pytorch.GatedStateSpacesLM", "config": GSS_CONFIG},
        versions=lambda: {"gated_state_spaces_pytorch": version("gated-state-spaces-pytorch")},
        notes="gss: upstream's gated_state_spaces_pytorch.GatedStateSpacesLM (GSS layers, DSS kernel), "
              "imported directly, so the checkpoint carries upstream key names by construction. It has "
              "no max_seq_len (the DSS kernel is built for each input's length), so training.json's "
              "seq_len is the training window. ~2 min (0.18-0.24 s/step). Only 500 steps: it memorises "
              "the 443 KB corpus fast and held-out loss rises with longer runs (lr 2e-3, otherwise "
              "these settings: 500 / 1,000 / 1,500 / 3,000 steps gave held-out 1.11 / 1.17 / 1.28 / "
              "1.71 nats/byte).",
    ),
}


def family_defaults(key: str) -> str:
    return "default: " + ", ".join(f"{name} {f[key]}" for name, f in FAMILIES.items())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(textwrap.fill(f["notes"], 88) for f in FAMILIES.values()))
    p.add_argument("--family", choices=FAMILIES, default="dsconv")
    p.add_argument("--steps", type=int, help=family_defaults("steps"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, help=family_defaults("lr"))
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 leaves the second core to other work")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", type=Path, help=family_defaults("out") + ", under examples/")
    args = p.parse_args()
    family = FAMILIES[args.family]
    args.steps = family["steps"] if args.steps is None else args.steps
    args.lr = family["lr"] if args.lr is None else args.lr
    args.out = HERE / family["out"] if args.out is None else args.out
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up (DsConv's data-dependent conv kernels are unstable at full lr from init), then cosine to 10%."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def random_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Random windows of seq_len + 1 bytes: inputs and next-byte targets."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, data: torch.Tensor, seq_len: int) -> float:
    """Mean next-byte cross-entropy (nats) over every non-overlapping held-out window: deterministic."""
    model.eval()
    n_windows = (len(data) - 1) // seq_len
    windows = torch.stack([data[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_windows)])
    total = 0.0
    for chunk in windows.split(16):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return total / (n_windows * seq_len)


def main() -> None:
    args = parse_args()
    family = FAMILIES[args.family]
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # batch sampling independent of init draws

    train_bytes, heldout_bytes = load_corpus()
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    heldout = torch.frombuffer(bytearray(heldout_bytes), dtype=torch.uint8).long()
    print(f"corpus: {len(train_bytes)} train bytes, {len(heldout_bytes)} held-out bytes")

    model = family["build"]()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters, {args.steps} steps of {args.batch} x {args.seq_len}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)

    start, recent = time.perf_counter(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = random_batch(train, args.batch, args.seq_len, gen)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = sum(recent) / len(recent)
            print(f"step {step + 1:5d}  loss {mean:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{time.perf_counter() - start:6.0f}s", flush=True)
            final_train, recent = mean, []
    seconds = time.perf_counter() - start

    held = heldout_loss(model, heldout, args.seq_len)
    bpb = held / math.log(2)
    print(f"held-out loss {held:.4f} nats/byte = {bpb:.4f} bits/byte ({seconds:.0f}s training)")

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    info = {
        **family["record"](),
        "parameters": n_params,
        "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len,  # training window (GatedStateSpacesLM itself has no length limit)
        "lr": args.lr, "warmup": args.warmup, "clip": args.clip, "seed": args.seed,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "final_train_loss": round(final_train, 4),  # mean over the last log interval
        "heldout_loss": round(held, 4),
        "heldout_bits_per_byte": round(bpb, 4),
        "corpus": {
            "source": "pydoc_data.topics.topics, sorted keys, joined by '\\n\\n', UTF-8",
            "train_bytes": len(train_bytes), "heldout_bytes": len(heldout_bytes),
            "sha256": hashlib.sha256(corpus_bytes()).hexdigest(),  # differs across Python versions
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        **family["versions"](),
        "command": "python " + shlex.join(sys.argv),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.out / 'model.safetensors'} and training.json")


if __name__ == "__main__":
    main()
