"""Checkpoint intake: read a state dict of any of upstream's three LMs from any common wrapping, safely,
tell the family from its keys, read the config from its shapes, and build the model.

Every failure is a `CheckpointError` with a one-screen, actionable message (library errors chained, never
shown raw). No code in a checkpoint runs unless the caller passes `trust_pickle=True` (`--trust-pickle`).
"""
from __future__ import annotations

import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from torch import nn

from .conv.forms import MODEL_FORMS
from .errors import CheckpointError
from .families import BY_MIXER, FAMILIES, Family, GatedLM

NEST_KEYS = ("model", "state_dict", "model_state_dict", "module")
# AutoregressiveWrapper, DDP, torch.compile, and Lightning's usual `self.model` attribute
PREFIXES = ("net.", "module.", "_orig_mod.", "model.")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_MIXER = re.compile(r"^layers\.\d+\.(\w+)\.")
_TOP_KEYS = ("token_emb.weight", "to_logits.weight")
_MAX_LIST = 12  # keys listed per category before "... and N more"
_EXPECTED = "Expected a state dict saved with torch.save (.pt/.pth/.bin/.ckpt) or a .safetensors file."


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A loaded model (eval mode, float32) with the config read from its shapes and what intake did."""

    model: GatedLM
    config: object  # the family's config dataclass
    source: str
    notes: tuple[str, ...]
    family: str = "GatedDsConvLM"  # upstream's class name


def _short(e: BaseException) -> str:
    """The telling line of an exception, trimmed: torch's own messages run to a screen or more."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {pick[:200]}"


def _describe_foreign(head: bytes) -> str:
    """What a file that is neither torch.save nor safetensors looks like, for the error message."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut by the 512-byte read is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if not text or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"unrecognised binary data (starts with {head[:8]!r})"
    return "a JSON file" if text.lstrip()[:1] in ("{", "[") else f"a text file (starts with {text.strip()[:30]!r})"


def _sniff(head: bytes, suffix: str) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors' or 'foreign', from the first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    # safetensors: u64 little-endian header length, then the JSON header; text files give absurd lengths
    if suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 28):
        return "safetensors"
    return "foreign"


def _unsafe_globals(e: BaseException, path: Path, kind: str) -> list[str]:
    """Python globals the weights-only unpickler refused (empty when the failure was something else)."""
    names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e)) if "Weights only load failed" in str(e) else []
    if names and kind == "zip":  # lists them all, by reading pickle opcodes only
        try:
            names += torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            pass
    return sorted(set(names))


def _load_torch(path: Path, kind: str, trust_pickle: bool, corrupt: str) -> object:
    if kind == "zip":
        if not zipfile.is_zipfile(path):  # a torch.save zip cut short has no central directory
            raise CheckpointError(corrupt + " (the zip archive torch.save writes is incomplete: truncated download or copy?)")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception as e:  # a damaged directory raises BadZipFile, or whatever its bytes make zipfile trip on
            raise CheckpointError(f"{corrupt} (its zip directory is damaged: {_short(e)})") from e
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl inside).")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        names = [] if trust_pickle else _unsafe_globals(e, path, kind)
        if names:
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            raise CheckpointError(
                f"{path} holds pickled Python objects ({shown}), not just tensors: loading it could run code "
                "embedded in the file, so it was not loaded (a whole model saved with torch.save(model) looks like this).\n"
                "Re-save only the weights, torch.save(model.state_dict(), 'weights.pt'), "
                "or re-run with --trust-pickle (only for files you trust)."
            ) from e
        if trust_pickle and isinstance(e, (ImportError, AttributeError)):
            raise CheckpointError(f"{path} holds pickled objects whose code cannot be imported here ({_short(e)}); "
                                  "install the package that defined them, or re-save only the state_dict.") from e
        raise CheckpointError(f"{corrupt} ({_short(e)})") from e


def _read_object(path: Path, trust_pickle: bool) -> object:
    """The raw object stored in `path` (a dict for state dicts), with file-level checks."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (no such file; working directory {Path.cwd()})")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it (.pt/.pth/.bin/.ckpt/.safetensors).")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or copy? Re-save or re-download it.")
    kind = _sniff(head, path.suffix.lower())
    corrupt = f"{path} is truncated or corrupt: it starts like a {'safetensors' if kind == 'safetensors' else 'torch.save'} file but cannot be read"
    if kind == "foreign":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or safetensors file: it looks like {_describe_foreign(head)}.\n{_EXPECTED}")
    if kind != "safetensors":
        return _load_torch(path, kind, trust_pickle, corrupt)
    from safetensors.torch import load_file

    if len(head) < 8 or int.from_bytes(head[:8], "little") + 8 > size:
        raise CheckpointError(corrupt + f" (its header claims more bytes than the file's {size})")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{corrupt} ({_short(e)})") from e


def _unwrap(obj: object, path: Path) -> tuple[dict, list[str]]:
    """Descend through {'model': ...}-style nesting (repeatedly) to a dict of tensors."""
    notes: list[str] = []
    for _ in range(8):
        if isinstance(obj, nn.Module):  # only reachable with trust_pickle
            notes.append(f"took state_dict() of pickled {type(obj).__name__}")
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors).")
        nested = next((k for k in NEST_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
        if nested is None:
            break
        notes.append(f"unwrapped {nested!r}")  # entries beside it (optimizer, step, ...) are not the model
        obj = obj[nested]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        inner = [k for k, v in obj.items() if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
        found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:8]) or "nothing"
        hint = (f"\nTensors sit under {', '.join(map(repr, inner))}, which is not a recognised nesting key "
                f"({', '.join(NEST_KEYS)}): re-save that entry alone, e.g. torch.save(ckpt[{inner[0]!r}], 'weights.pt').") if inner else ""
        raise CheckpointError(f"{path} loads but contains no tensors; it holds {found}.{hint}")
    return tensors, notes


def read_state_dict(path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read tensors from a file, unwrap nesting, strip prefixes. Returns (state_dict, notes)."""
    path = Path(path)
    sd, notes = _unwrap(_read_object(path, trust_pickle), path)
    # wrapper prefixes, also stacked (`module._orig_mod.net.`); each only when every key has it
    stripped = ""
    while (p := next((p for p in PREFIXES if all(k.startswith(p) for k in sd)), None)) is not None:
        sd, stripped = {k[len(p):]: v for k, v in sd.items()}, stripped + p
    notes += [f"stripped prefix {stripped!r}"] if stripped else []
    # float32 throughout: the exporters and their tolerances assume it; other dtypes are left for the checks
    cast = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point() and v.dtype != torch.float32)
    notes += [f"cast {d} -> float32 ({n} tensor{'s' * (n != 1)})" for d, n in cast.items()]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, notes


def _size(sd: dict, what: str, candidates: list[tuple[str, int]], layers: list[int]) -> int:
    """Dimension `axis` of the first tensor among candidate keys (`{i}` = layer index) present in sd that has it."""
    for template, axis in candidates:
        for i in layers if "{i}" in template else [0]:
            t = sd.get(template.format(i=i))
            if t is not None and t.dim() > axis and t.shape[axis] > 0:
                return int(t.shape[axis])
    raise CheckpointError(f"cannot infer {what}: none of {', '.join(c for c, _ in candidates)} is present.")


def detect_family(state_dict) -> Family:
    """The family whose mixer names the layers' keys (layers.{i}.dsconv.*, .dss.* or .mhesa.*)."""
    mixers = {m.group(1) for k in state_dict if (m := _MIXER.match(k))} & set(BY_MIXER)
    if len(mixers) == 1:
        return BY_MIXER[mixers.pop()]
    names = ", ".join(f"{f.upstream_class} (layers.{{i}}.{f.mixer}.*)" for f in FAMILIES.values())
    if mixers:
        raise CheckpointError(f"the layers mix the keys of several families ({', '.join(sorted(mixers))}); "
                              f"a checkpoint holds one of {names}.")
    seen = sorted({m.group(1) for k in state_dict if (m := _MIXER.match(k))})
    raise CheckpointError(f"cannot tell the model family: no layer has a sequence mixer, layers.{{i}}.dsconv, .dss or .mhesa "
                          f"(layer entries found: {', '.join(seen) or 'none'}). Expected one of {names}.")


def infer_config(state_dict, *, max_seq_len: int = 2048, dss_kernel_lambda_imag_exp: bool | None = None):
    """The family's config (num_tokens, dim, depth, the mixer's sizes, dim_expansion_factor) from tensor shapes.

    dss_kernel_lambda_imag_exp (GatedStateSpacesLM only; shapes cannot tell it) defaults to upstream's True.
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise CheckpointError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    sd = state_dict
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers and not any(k in sd for k in _TOP_KEYS):
        first = ", ".join(list(sd)[:6])
        hint = next((f"\nKeys carry the prefix {k[:-len(t)]!r}, which is not stripped automatically ({', '.join(PREFIXES)} are)."
                     for k in sd for t in _TOP_KEYS if k.endswith("." + t)), "")
        raise CheckpointError(f"no gated-state-spaces LM weights found: {len(sd)} tensors, none named token_emb.weight, "
                              f"layers.{{i}}.* or to_logits.weight (first keys: {first}).{hint}")
    if not layers:
        raise CheckpointError("the checkpoint has no layers.{i}.* tensors: a gated-state-spaces LM needs depth >= 1.")
    family = detect_family(sd)
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"layer indices are not contiguous: found layers {_indices(layers)}, "
                              f"missing {_indices(gaps)}; a {family.upstream_class} numbers its layers 0..depth-1.")
    if dss_kernel_lambda_imag_exp is not None and family.name != "gss":
        raise CheckpointError(f"dss_kernel_lambda_imag_exp applies to GatedStateSpacesLM only; this checkpoint is a {family.upstream_class}.")
    options = {} if dss_kernel_lambda_imag_exp is None else {"dss_kernel_lambda_imag_exp": bool(dss_kernel_lambda_imag_exp)}
    try:
        return family.read_config(lambda what, candidates: _size(sd, what, candidates, layers), len(layers), max_seq_len, options)
    except ValueError as e:
        raise CheckpointError(f"{e}: not a valid {family.upstream_class}.") from None


def _indices(ids: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> '0..3,5' (runs of three or more collapse)."""
    runs = [[n for _, n in run] for _, run in groupby(enumerate(ids), lambda p: p[1] - p[0])]
    return ",".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def _group(keys) -> str:
    """Keys compactly: per-layer keys differing only by index merge (`layers.{0,1}.to_u.0.weight`); capped."""
    plain, per_layer = [], {}
    for k in keys:
        if m := _LAYER.match(k):
            per_layer.setdefault(k[m.end():], []).append(int(m.group(1)))
        else:
            plain.append(k)
    shown = sorted(plain) + [f"layers.{ids[0]}.{rest}" if len(ids) == 1 else f"layers.{{{_indices(sorted(ids))}}}.{rest}"
                             for rest, ids in sorted(per_layer.items())]
    more = len(shown) - _MAX_LIST
    return ", ".join(shown[:_MAX_LIST]) + (f", ... and {more} more" if more > 0 else "")


def _problems(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> list[str]:
    """Every mismatch between the model's parameters and the checkpoint, as report lines."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    lines = [f"missing keys ({len(missing)}): {_group(missing)}"] if missing else []
    lines += [f"unexpected keys ({len(unexpected)}): {_group(unexpected)}"] if unexpected else []
    bad = [f"  {k}: expected {tuple(v.shape)}, got {tuple(sd[k].shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    bad += [f"  {k}: dtype {str(sd[k].dtype).removeprefix('torch.')}, expected a floating-point tensor"
            for k in expected if k in sd and not sd[k].is_floating_point()]
    more = [f"  ... and {len(bad) - _MAX_LIST} more"] if len(bad) > _MAX_LIST else []
    return lines + ([f"shape/dtype mismatches ({len(bad)}):", *bad[:_MAX_LIST], *more] if bad else [])


def load_checkpoint(path, *, max_seq_len: int = 2048, conv: str = "fft", trust_pickle: bool = False,
                    dss_kernel_lambda_imag_exp: bool | None = None) -> LoadedCheckpoint:
    """Read `path`, tell its family, infer the config from its shapes, and return the model (eval mode)
    loaded with `strict=True`."""
    if conv not in MODEL_FORMS:
        raise CheckpointError(f"unknown convolution form {conv!r}; choose one of {', '.join(MODEL_FORMS)}")
    sd, notes = read_state_dict(path, trust_pickle=trust_pickle)
    config = infer_config(sd, max_seq_len=max_seq_len, dss_kernel_lambda_imag_exp=dss_kernel_lambda_imag_exp)
    family = FAMILIES[config.family]
    # Built on the meta device: no random init to throw away; the checkpoint's tensors are assigned in.
    with torch.device("meta"):
        model = family.model(config, conv=conv)
    problems = _problems(model.state_dict(), sd)
    if problems:
        sizes = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k not in ("family", "max_seq_len"))
        raise CheckpointError(
            f"{path} does not fit the {family.upstream_class} its shapes describe ({sizes}):\n  "
            + "\n  ".join(problems)
            + f"\nKey names must be upstream gated-state-spaces-pytorch {family.upstream_class}'s (optionally under AutoregressiveWrapper's net.)."
        )
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except Exception as e:  # the comparison above should have caught it; keep the promise of a clean message
        raise CheckpointError(f"{path}: the weights do not load into {family.upstream_class} ({_short(e)})") from e
    return LoadedCheckpoint(model=model.eval(), config=config, source=str(path), notes=tuple(notes), family=family.upstream_class)
