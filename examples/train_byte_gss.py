"""Train a small byte-level GatedStateSpacesLM (GSS layers, DSS kernel) on Python's bundled pydoc topics.

The model is upstream's own `gated_state_spaces_pytorch.GatedStateSpacesLM`, imported directly:
it is the class users train with, so examples/byte_gss/model.safetensors carries upstream key
names by construction. Same corpus, split, optimiser and checkpoint layout as train_byte_lm.py
(the GatedDsConvLM example). GatedStateSpacesLM has no max_seq_len: the DSS kernel is built for
whatever length it is given, so training.json records the training seq_len instead.

    python examples/train_byte_gss.py           # ~2 min on one CPU thread (0.18-0.24 s/step)

Only 500 steps: this model memorises the 443 KB corpus fast, and held-out loss rises with longer
runs (lr 2e-3, otherwise these settings: 500 / 1,000 / 1,500 / 3,000 steps gave held-out
1.11 / 1.17 / 1.28 / 1.71 nats/byte).
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
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from gated_state_spaces_pytorch import GatedStateSpacesLM
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # byte_corpus, when run as a script
from byte_corpus import corpus_bytes, load_corpus  # noqa: E402

# Upstream constructor keywords. dss_kernel_lambda_imag_exp is spelled out: the state dict's
# shapes are the same either way, so only this record tells a loader which kernel was trained.
CONFIG = dict(num_tokens=256, dim=128, depth=3, dim_expansion_factor=2,
              dss_kernel_N=64, dss_kernel_H=128, dss_kernel_lambda_imag_exp=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 leaves the second core to other work")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "byte_gss")
    return p.parse_args()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine to 10%."""
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
def heldout_loss(model: GatedStateSpacesLM, data: torch.Tensor, seq_len: int) -> float:
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
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # batch sampling independent of init draws

    train_bytes, heldout_bytes = load_corpus()
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    heldout = torch.frombuffer(bytearray(heldout_bytes), dtype=torch.uint8).long()
    print(f"corpus: {len(train_bytes)} train bytes, {len(heldout_bytes)} held-out bytes")

    model = GatedStateSpacesLM(**CONFIG)
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
        "model": "gated_state_spaces_pytorch.GatedStateSpacesLM",
        "config": CONFIG,
        "parameters": n_params,
        "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len,  # training window; the model itself has no length limit
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
        "gated_state_spaces_pytorch": version("gated-state-spaces-pytorch"),
        "command": "python " + shlex.join(sys.argv),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.out / 'model.safetensors'} and training.json")


if __name__ == "__main__":
    main()
