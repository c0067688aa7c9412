"""Train a byte-level BPE tokenizer and a small chat-shaped GatedStateSpacesLM on Python's pydoc topics.

The bundled example with a real tokenizer (examples/bpe_chat/): exported with `--tokenizer`, every
runtime takes and gives text, and gss-serve answers chat requests through the template.

    python examples/train_bpe_chat.py        # -> examples/bpe_chat/, ~11 min on one CPU thread

1. Split: 4 of the 79 topics (5%) are held out: calls, del, lambda, yield. They are chosen among the
   topics that share no paragraph with any other topic: many pydoc topics repeat each other's text
   ("compound" repeats "for" and "try" whole and nearly all of "while" and "with"; "typesseq" nearly all
   of "typesseq-mutable"), so holding out gss_export.corpus's byte tail (3 of its 5 topics are such
   copies) would measure recall.
2. Tokenizer: byte-level BPE (`tokenizers`), trained on the 75 training topics' text (sorted keys, joined
   by blank lines), special tokens <|endoftext|> (eos), <|system|>, <|user|>, <|assistant|>; saved as
   tokenizer.json, tokenizer_config.json (eos_token, chat_template, model_max_length) and
   special_tokens_map.json.
3. Conversations: one per topic, rendered through that chat template:
   <|user|>{the topic's name, or a short question about it}<|endoftext|><|assistant|>{topic text}<|endoftext|>
   (a quarter of them with a system message first).
4. Model: upstream's gated_state_spaces_pytorch.GatedStateSpacesLM, imported directly (so the checkpoint
   has upstream's key names), num_tokens = the tokenizer's vocabulary, trained on random windows.
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
from safetensors.torch import save_file

from gss_export.corpus import corpus_bytes

HERE = Path(__file__).resolve().parent

VOCAB_SIZE = 2048
EOS, SYSTEM, USER, ASSISTANT = "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, SYSTEM, USER, ASSISTANT]  # ids 0..3
MODEL_MAX_LENGTH = 2048  # what gss-export's default max_seq_len validates; GatedStateSpacesLM itself has no limit
# Hugging Face's convention: `messages` (role, content) and `add_generation_prompt`; roles system/user/assistant
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Upstream constructor keywords (num_tokens is the tokenizer's vocabulary size)
GSS_CONFIG = dict(num_tokens=VOCAB_SIZE, dim=128, depth=3, dim_expansion_factor=2,
                  dss_kernel_N=64, dss_kernel_H=128, dss_kernel_lambda_imag_exp=True)

# The user's side of a conversation: {key} is the pydoc topic name (what help() takes), {title} the
# topic's heading without quotes ('The assert statement'), {subject} the same with a lower-case first letter.
QUESTIONS = (
    "{key}",
    "{key}",
    "{title}",
    "help('{key}')",
    "What is {subject}?",
    "Tell me about {subject}.",
    "Explain {subject}.",
    "How does {key} work in Python?",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with the Python documentation.",
    "You are pydoc: you answer with the reference text of a topic.",
)
SYSTEM_FRACTION = 0.25


# ---------------------------------------------------------------- corpus split and conversations


HELDOUT_TOPICS = ("calls", "del", "lambda", "yield")


def shared_paragraphs(key: str, topics: dict[str, str]) -> list[str]:
    """The paragraphs (over 40 characters) of topic `key` that appear verbatim in another topic."""
    others = "\n".join(text for k, text in topics.items() if k != key)
    return [p for p in topics[key].split("\n\n") if len(p) > 40 and p in others]


def topic_texts() -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out): topic name -> text, sorted by name; held-out topics share no text with the others."""
    from pydoc_data.topics import topics

    for key in HELDOUT_TOPICS:
        assert not shared_paragraphs(key, topics), f"held-out topic {key!r} repeats text of another topic"
    train = {k: topics[k] for k in sorted(topics) if k not in HELDOUT_TOPICS}
    return train, {k: topics[k] for k in sorted(topics) if k in HELDOUT_TOPICS}


def train_text(train: dict[str, str]) -> str:
    """What the tokenizer is trained on: the training topics as gss_export.corpus joins them."""
    return "\n\n".join(train.values())


def question_fields(key: str, text: str) -> dict[str, str]:
    title = text.split("\n", 1)[0].replace('"', "").strip()
    subject = title[:1].lower() + title[1:] if title[1:2].islower() else title
    return {"key": key, "title": title, "subject": subject}


def messages_for(key: str, text: str, question: str, system: str | None = None) -> list[dict[str, str]]:
    user = question.format(**question_fields(key, text))
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": text}]


def chat_renderer():
    """The chat template as Hugging Face renders it (a sandboxed jinja2 environment, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)
    return lambda messages, add_generation_prompt=False: template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token=EOS, bos_token="")


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte has a token
    tokenizer.train_from_iterator([text], trainer)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tokenizer


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "unk_token": None,
        "pad_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOS, "additional_special_tokens": SPECIAL_TOKENS[1:]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------- batches and evaluation


class Conversations:
    """Training conversations as token ids, each rendered with a random question (and sometimes a system
    message); encodings are cached, since a topic's text is the same every time."""

    def __init__(self, topics: dict[str, str], tokenizer, rng: random.Random):
        self.keys, self.topics, self.rng = list(topics), topics, rng
        self.render, self.tokenizer, self.cache = chat_renderer(), tokenizer, {}
        lengths = [len(self.encode(k, QUESTIONS[0], None)) for k in self.keys]
        self.length_weights = lengths  # a random position in the text: topics in proportion to their length

    def encode(self, key: str, question: str, system: str | None) -> list[int]:
        text = self.render(messages_for(key, self.topics[key], question, system))
        if text not in self.cache:
            self.cache[text] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.cache[text]

    def sample(self, key: str | None = None) -> list[int]:
        key = key if key is not None else self.rng.choice(self.keys)
        system = self.rng.choice(SYSTEM_PROMPTS) if self.rng.random() < SYSTEM_FRACTION else None
        return self.encode(key, self.rng.choice(QUESTIONS), system)

    def window(self, length: int) -> list[int]:
        """length ids: half the time from a conversation's start (the question, then the answer's start), half
        from a random point of the text; later conversations (random topics) fill the rest."""
        if self.rng.random() < 0.5:
            ids, start = self.sample(), 0
        else:
            ids = self.sample(self.rng.choices(self.keys, weights=self.length_weights)[0])
            start = self.rng.randrange(len(ids) - 1)
        ids = ids[start:]
        while len(ids) < length:
            ids = ids + self.sample()
        return ids[:length]

    def batch(self, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.tensor([self.window(seq_len + 1) for _ in range(batch)])
        return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def answer_loss(model: torch.nn.Module, topics: dict[str, str], tokenizer) -> dict:
    """Cross-entropy of each topic's answer (its text and the closing <|endoftext|>) after the question
    `{topic name}`, the whole conversation in one forward pass: nats per token and bits per UTF-8 byte of
    the topic text (the closing <|endoftext|> is counted in the nats, not in the bytes)."""
    model.eval()
    render = chat_renderer()
    assistant = tokenizer.token_to_id(ASSISTANT)
    nats = tokens = text_bytes = 0
    for key, text in topics.items():
        ids = tokenizer.encode(render(messages_for(key, text, "{key}")), add_special_tokens=False).ids
        first = ids.index(assistant) + 1  # the answer's first token is predicted at this position
        logits = model(torch.tensor([ids[:-1]]))[0]
        nats += F.cross_entropy(logits[first - 1 :], torch.tensor(ids[first:]), reduction="sum").item()
        tokens += len(ids) - first
        text_bytes += len(text.encode("utf-8"))
    model.train()
    return {"topics": len(topics), "tokens": tokens, "bytes": text_bytes,
            "loss": round(nats / tokens, 4), "bits_per_byte": round(nats / math.log(2) / text_bytes, 4)}


@torch.no_grad()
def generate(model, prompt_ids: list[int], new: int, temperature: float = 0.0, top_k: int = 0,
             gen: torch.Generator | None = None, stop: int | None = None) -> list[int]:
    """Upstream-style decoding (the whole sequence re-run for each token): greedy, or sampled."""
    model.eval()
    ids = list(prompt_ids)
    for _ in range(new):
        logits = model(torch.tensor([ids]))[0, -1]
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        ids.append(token)
        if token == stop:
            break
    return ids[len(prompt_ids):]


# ---------------------------------------------------------------- training


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 leaves the second core to other work")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps too, in training.json's "
                   "heldout_curve (0: only at the end; evaluation time is not counted in `seconds`)")
    p.add_argument("--out", type=Path, default=HERE / "bpe_chat")
    return p.parse_args()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine to 10%."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


SAMPLE_PROMPTS = ("for", "What is the assert statement?", "lambda")  # "lambda" is a held-out topic


def main() -> None:
    from gated_state_spaces_pytorch import GatedStateSpacesLM  # upstream's own class

    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # batch sampling independent of init draws

    train_topics, held_topics = topic_texts()
    text = train_text(train_topics)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(text)
    tokenizer_seconds = time.perf_counter() - t0
    text_bytes = len(text.encode("utf-8"))
    bytes_per_token = text_bytes / len(tokenizer.encode(text, add_special_tokens=False).ids)
    print(f"tokenizer: {VOCAB_SIZE} tokens, {bytes_per_token:.2f} bytes/token on its training text "
          f"({tokenizer_seconds:.1f}s); held-out topics: {', '.join(held_topics)}")

    conversations = Conversations(train_topics, tokenizer, rng)
    model = GatedStateSpacesLM(**GSS_CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters, {args.steps} steps of {args.batch} x {args.seq_len} tokens, "
          f"{sum(conversations.length_weights)} tokens in the {len(train_topics)} training conversations")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    start, recent, eval_seconds, curve = time.perf_counter(), [], 0.0, []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = conversations.batch(args.batch, args.seq_len)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = sum(recent) / len(recent)
            print(f"step {step + 1:5d}  loss {mean:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{time.perf_counter() - start - eval_seconds:6.0f}s", flush=True)
            final_train, recent = mean, []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            t = time.perf_counter()
            held = answer_loss(model, held_topics, tokenizer)
            eval_seconds += time.perf_counter() - t
            curve.append([step + 1, held["loss"], held["bits_per_byte"]])
            print(f"           held-out {held['loss']:.4f} nats/token = {held['bits_per_byte']:.4f} bits/byte", flush=True)
    seconds = time.perf_counter() - start - eval_seconds

    held = answer_loss(model, held_topics, tokenizer)
    curve.append([args.steps, held["loss"], held["bits_per_byte"]])
    seen = answer_loss(model, train_topics, tokenizer)
    print(f"held-out topics: {held['loss']:.4f} nats/token = {held['bits_per_byte']:.4f} bits/byte; "
          f"training topics: {seen['loss']:.4f} nats/token = {seen['bits_per_byte']:.4f} bits/byte "
          f"({seconds:.0f}s training)")

    render = chat_renderer()
    gen = torch.Generator().manual_seed(args.seed)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(render([{"role": "user", "content": prompt}], add_generation_prompt=True),
                               add_special_tokens=False).ids
        sampled = dict(temperature=0.8, top_k=40, gen=gen)
        for label, options in (("greedy", {}), ("sampled, temperature 0.8, top-k 40", sampled)):
            out = tokenizer.decode(generate(model, ids, 60, stop=tokenizer.token_to_id(EOS), **options),
                                   skip_special_tokens=False)
            samples.append({"prompt": prompt, "decoding": label, "text": out})
            print(f"{prompt!r} ({label}): {out!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, args.out)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    info = {
        "model": "gated_state_spaces_pytorch.GatedStateSpacesLM",
        "config": GSS_CONFIG,
        "parameters": n_params,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers), ByteLevel pre-tokenizer and decoder",
            "vocab_size": VOCAB_SIZE, "special_tokens": SPECIAL_TOKENS, "eos_token": EOS,
            "trained_on": "the training topics' text (sorted keys, joined by '\\n\\n', UTF-8)",
            "bytes_per_token": round(bytes_per_token, 3),
            "chat_template": CHAT_TEMPLATE,
        },
        "data": {
            "conversation": "<|user|>{question}<|endoftext|><|assistant|>{topic text}<|endoftext|>, through the chat template",
            "questions": list(QUESTIONS), "system_prompts": list(SYSTEM_PROMPTS), "system_fraction": SYSTEM_FRACTION,
            "windows": "half from a conversation's start, half from a random point (topics weighted by length); "
                       "random conversations fill the rest of a window; loss on every token",
            "train_topics": len(train_topics), "heldout_topics": list(held_topics),
            "train_conversation_tokens": sum(conversations.length_weights),
        },
        "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len,  # training window (GatedStateSpacesLM itself has no length limit)
        "optimiser": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "schedule": "linear warm-up then cosine to 10%"},
        "lr": args.lr, "warmup": args.warmup, "clip": args.clip, "seed": args.seed,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "final_train_loss": round(final_train, 4),  # nats/token, mean over the last log interval
        "heldout": {**held, "what": "answer tokens after the question '{topic name}', one forward pass per topic; "
                                    "loss in nats/token, bits per UTF-8 byte of the topic text"},
        "heldout_curve": curve,  # [step, nats/token, bits/byte]
        "train_topics_loss": seen,  # the same measure on the training topics: how much is memorised
        "corpus": {
            "source": "pydoc_data.topics.topics, sorted keys, joined by '\\n\\n', UTF-8",
            "topics": len(train_topics) + len(held_topics), "bytes": len(corpus_bytes()),
            "train_topics_bytes": text_bytes,  # the tokenizer's training text
            "heldout_topics_bytes": sum(len(t.encode("utf-8")) for t in held_topics.values()),
            "sha256": hashlib.sha256(corpus_bytes()).hexdigest(),  # differs across Python versions
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gated_state_spaces_pytorch": version("gated-state-spaces-pytorch"),
        "tokenizers": version("tokenizers"),
        "samples": samples,  # 60 new tokens at most, eager upstream decoding, after the chat template's prompt
        "command": "python " + shlex.join(sys.argv),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.out}: model.safetensors, tokenizer files and training.json")


if __name__ == "__main__":
    main()
