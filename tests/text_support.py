"""A real tokenizer for the text tests, trained in the test: byte-level BPE with merges, special tokens, a
chat template, and a corpus with multi-byte characters (so single tokens split characters and merges cross
them). Plus a small upstream model of that vocabulary, its export made with --tokenizer, and eager's
greedy ids: made once per test session.
"""
from __future__ import annotations

import json
from pathlib import Path

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB = 512
# Hugging Face's convention: a jinja2 template over `messages`, ending with the assistant's cue when
# add_generation_prompt is set
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# multi-byte text of 2, 3 and 4 bytes per character, repeated so that merges form inside and across them
MULTIBYTE = "naïve café, smörgåsbord; Ελληνικά; 日本語のテキスト; emoji 🙂🚀 and ∑∫√ signs. "
PROMPTS = ["The for statement", "café 日本", "🙂 emoji", "x"]
_made: dict = {}


def corpus() -> list[str]:
    from gss_export.corpus import load_corpus

    train, _ = load_corpus()
    text = train[:60_000].decode("utf-8", errors="ignore")
    return [text[i : i + 2000] for i in range(0, len(text), 2000)] + [MULTIBYTE * 300]


def train_tokenizer(folder: Path, chat_template: bool = True) -> Path:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `folder` (created); returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
              "unk_token": None, "model_max_length": 1024}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}, indent=2))
    return folder


def tokenizer_folder(tmp_path_factory) -> Path:
    if "tokenizer" not in _made:
        _made["tokenizer"] = train_tokenizer(tmp_path_factory.mktemp("bpe") / "tok")
    return _made["tokenizer"]


def text_upstream(family: str = "dsconv"):
    """Upstream's model of `family` over the tokenizer's vocabulary, seeded random weights, eval mode."""
    import torch
    from tokenizers import Tokenizer

    from gss_export.families import FAMILIES

    sizes = {"dsconv": dict(dim=32, depth=2, heads=2, dim_dsconv=16),
             "gss": dict(dim=32, depth=2, dss_kernel_N=16, dss_kernel_H=32),
             "mhesa": dict(dim=32, depth=2, heads=2, dim_mhesa=16)}[family]
    num_tokens = Tokenizer.from_file(str(_made["tokenizer"] / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(21)
    entry = FAMILIES[family]
    return entry.upstream(entry.config(num_tokens=num_tokens, dim_expansion_factor=2, **sizes)).eval()


TEXT_MAX_LEN = 256


def text_export(tmp_path_factory, family: str = "dsconv") -> Path:
    """The small model of `family` exported to ONNX with the trained tokenizer (not validated here)."""
    key = ("export", family)
    if key not in _made:
        from gss_export.checkpoint import load_checkpoint
        from gss_export.export import export_model

        tokenizer_folder(tmp_path_factory)
        import torch

        ckpt = tmp_path_factory.mktemp(f"text_{family}") / "model.pt"
        torch.save(text_upstream(family).state_dict(), ckpt)
        out = ckpt.parent / "export"
        model = load_checkpoint(ckpt, max_seq_len=TEXT_MAX_LEN).model
        export_model(model, "onnx", out, validate=False, tokenizer=_made["tokenizer"])
        _made[key] = out
    return _made[key]


def eager_greedy_ids(family: str, prompt_ids: list[int], new: int, eos_id: int | None = None) -> list[int]:
    """Upstream eager's greedy continuation (full recompute each token), stopping before eos_id."""
    import torch

    model = text_upstream(family)
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(new):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
            ids.append(token)
    return out
