"""A Hugging Face tokenizer beside the model: text in and out for any vocabulary (BPE, unigram, WordPiece).

An export carries `tokenizer.json` (the `tokenizers` format every Hugging Face runtime reads) and, when
given, `tokenizer_config.json` and `special_tokens_map.json`: the special tokens and the chat template.
`read_tokenizer` reads and checks them (the exporter before copying, every runtime when loading);
`vocabulary_for` gives a model folder's `Vocabulary`: this tokenizer's when the folder has one, else
bytes (num_tokens 256) or ids only.

Streaming text: a token may end inside a multi-byte character, or change how the text before it
reads (a decoder that joins word pieces). `TokenizerStream` decodes a window from the last point
where the text was whole, and shows only text that no later token can change: streamed pieces
joined equal the ids decoded at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import RuntimeInputError
from .vocabulary import Vocabulary

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_FILE)
SPECIAL_NAMES = ("eos", "bos", "unk", "pad")
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TokenizerError(RuntimeInputError):
    """A tokenizer file that cannot be read, or that does not fit the model."""


@dataclass
class TokenizerFiles:
    """A checked tokenizer: the `tokenizers` object, its special tokens (text and id) and chat template.

    files: name -> path of each file found (tokenizer.json always); vocab_size: ids it can produce,
    added tokens included.
    """

    tokenizer: object
    files: dict[str, Path]
    vocab_size: int
    special: dict[str, tuple[str | None, int | None]]
    chat_template: str | None
    add_bos_token: bool

    @property
    def eos_token_id(self) -> int | None:
        return self.special["eos"][1]

    def record(self) -> dict:
        """What config.json records of it: the files, the size and the special tokens (Node.js and the page read it)."""
        out = {"files": sorted(self.files), "vocab_size": self.vocab_size, "chat_template": self.chat_template is not None}
        for name, (text, token) in self.special.items():
            out[f"{name}_token"], out[f"{name}_token_id"] = text, token
        return out

    def check_fits(self, num_tokens: int) -> None:
        if self.vocab_size > num_tokens:
            raise TokenizerError(f"{self.files[TOKENIZER_FILE]}: the tokenizer has {self.vocab_size} tokens but the model "
                                 f"has num_tokens {num_tokens}: it would produce ids the model cannot read (is it the "
                                 "tokenizer the model was trained with?)")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(path: str | Path) -> TokenizerFiles:
    """A `tokenizer.json` file, or a folder holding it (and optionally tokenizer_config.json and
    special_tokens_map.json), read and checked; TokenizerError says what is wrong."""
    from tokenizers import Tokenizer

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    main = path / TOKENIZER_FILE if path.is_dir() else path
    if not main.is_file():
        raise TokenizerError(f"{path}: no {TOKENIZER_FILE} there (give a Hugging Face tokenizer.json or the folder holding it)")
    try:
        tokenizer = Tokenizer.from_str(main.read_text(encoding="utf-8"))
    except Exception as e:  # the Rust side raises plain Exceptions with serde's message
        raise TokenizerError(f"{main}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    files = {TOKENIZER_FILE: main}
    settings: dict = {}
    for name in (SPECIAL_FILE, CONFIG_FILE):  # tokenizer_config.json's values win, as in transformers
        if path.is_dir() and (folder / name).is_file():
            files[name] = folder / name
            settings.update(_json(folder / name))
    special = {}
    for name in SPECIAL_NAMES:
        text = _token_text(settings.get(f"{name}_token"))
        token = tokenizer.token_to_id(text) if text is not None else None
        if text is not None and token is None:
            raise TokenizerError(f"{folder}: {name}_token {text!r} is not a token of {main.name}")
        special[name] = (text, token)
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one, as transformers picks it
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / CONFIG_FILE}: chat_template must be a string (a jinja2 template)")
    return TokenizerFiles(tokenizer, files, tokenizer.get_vocab_size(with_added_tokens=True), special, template,
                          bool(settings.get("add_bos_token", False)))


class TokenizerVocabulary(Vocabulary):
    """A model's text through its Hugging Face tokenizer. Pieces are the tokenizer's own token strings
    (unique per id, as vLLM reports them); decoding skips special tokens, as OpenAI-style servers show text."""

    def __init__(self, files: TokenizerFiles, num_tokens: int):
        files.check_fits(num_tokens)
        self.files, self.tokenizer = files, files.tokenizer
        self.size, self.text, self.kind = num_tokens, True, "tokenizer"
        self._pieces = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Text -> ids; special=True adds what the tokenizer's post-processor adds (a bos, say), as a
        completion prompt gets; a rendered chat template already holds its special tokens (False)."""
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _piece(self, token: int) -> str:
        piece = self.tokenizer.id_to_token(token)
        return piece if piece is not None else f"token_id:{token}"  # ids past the tokenizer's, below num_tokens

    def stream(self) -> "TokenizerStream":
        return TokenizerStream(self)

    def eos_token(self, eos_id: int | None) -> str | None:
        return self.tokenizer.id_to_token(eos_id) if eos_id is not None else None


class TokenizerStream:
    """Text of ids as they come (TextStream's interface). Shown text never changes: a piece is shown once
    the window's text no longer ends in an incomplete character."""

    def __init__(self, vocab: TokenizerVocabulary):
        self.decode = vocab.decode
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:] are decoded together with what came since
        self.shown = 0  # ids[:shown] have had their text shown

    def add(self, ids: Sequence[int]) -> str:
        self.ids += [int(t) for t in ids]
        if len(self.ids) == self.shown:
            return ""
        before = self.decode(self.ids[self.start : self.shown])
        now = self.decode(self.ids[self.start :])
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""  # a character still incomplete (or nothing visible yet): hold it
        self.start, self.shown = self.shown, len(self.ids)
        return now[len(before) :]

    def offsets(self, ids: Sequence[int], start: int) -> tuple[str, list[int]]:
        offsets, pieces = [], []
        for t in ids:
            offsets.append(start)
            piece = self.add([t])
            pieces.append(piece)
            start += len(piece)
        return "".join(pieces), offsets

    def end(self) -> str:
        """What is still held back (an incomplete character decodes as U+FFFD)."""
        before = self.decode(self.ids[self.start : self.shown])
        now = self.decode(self.ids[self.start :])
        self.start = self.shown = len(self.ids)
        return now[len(before) :]


def vocabulary_for(folder: Path | None, num_tokens: int) -> Vocabulary:
    """The model's vocabulary: its export's tokenizer when `folder` has tokenizer.json, else bytes or ids."""
    if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
        return TokenizerVocabulary(read_tokenizer(folder), num_tokens)
    return Vocabulary(num_tokens)
