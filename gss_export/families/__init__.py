"""The model families of gated-state-spaces-pytorch 0.1.0, one module each, and the table that names them.

A family is its layer and mixer (forward and step side by side), its config, how intake reads that
config from weight shapes, and the kind of state its decoder carries:

- `dsconv` (`GatedDsConvLM`): the kernel comes from the input; the state grows by one slot per token
  ("append": per layer, the conv inputs and kernel values of every slot so far).
- `gss` (`GatedStateSpacesLM`, DSS kernel) and `mhesa` (`GatedExponentialSmoothingLM`): the kernel
  comes from parameters and the layer is an exact linear recurrence ("replace": per layer, one
  fixed-size state, returned whole at each step).

Adding a family: a module with those parts (its config saying upstream's class, its decoder's state and,
if measured otherwise, `prefill_above`: `gated.FamilyConfig`) and one `Family` entry below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .dsconv import DsConvConfig, GatedDsConvLM
from .dss import GatedStateSpacesLM, StateSpacesConfig
from .gated import GatedLM, expansion_factor
from .mhesa import ExponentialSmoothingConfig, GatedExponentialSmoothingLM

# size(what, [(key template, axis), ...]) -> int: a dimension read from the checkpoint ({i}: a layer index)
SizeReader = Callable[[str, list], int]


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model.family
    config: type  # also says upstream's class, the decoder's state and prefill_above (`gated.FamilyConfig`)
    model: type
    mixer: str  # the mixer's attribute in each layer, as upstream names it: layers.{i}.<mixer>.*
    read_config: Callable  # (size: SizeReader, depth, max_seq_len, options) -> config
    # a measured choice that differs from the targets' defaults (benchmarks/families.py):
    auto_forms: dict = field(default_factory=dict)  # target -> the form `auto` means for this family

    @property
    def upstream_class(self) -> str:
        """The LM class in gated_state_spaces_pytorch."""
        return self.config.upstream_class

    @property
    def state(self) -> str:
        """"append" (a slot per token) or "replace" (fixed size)."""
        return self.config.state

    @property
    def prefill_above(self) -> int:
        """A call of more new tokens goes through the prefill graph (measured: benchmarks/families.py)."""
        return self.config.prefill_above

    def upstream(self, config):
        """Upstream's eager model of `config` (random weights), the reference for validation."""
        return config.upstream()


L = "layers.{i}."


def _dsconv_config(size: SizeReader, depth: int, max_seq_len: int, options: dict) -> DsConvConfig:
    dim = size("dim", [("token_emb.weight", 1), ("to_logits.weight", 1), (L + "to_u.0.weight", 1)])
    width = size("dim_dsconv", [(L + "to_v.0.weight", 0), (L + "dsconv.to_weight.weight", 1), (L + "to_gate.weight", 1)])
    heads = size("heads", [(L + "dsconv.to_weight.weight", 0)])
    if width % heads:
        raise ValueError(f"dim_dsconv={width} (from layers.*.to_v.0.weight) is not divisible by heads={heads} "
                         "(from layers.*.dsconv.to_weight.weight)")
    return DsConvConfig(num_tokens=_vocab(size), dim=dim, depth=depth, heads=heads, dim_dsconv=width,
                        dim_expansion_factor=_factor(size, dim), max_seq_len=max_seq_len)


def _gss_config(size: SizeReader, depth: int, max_seq_len: int, options: dict) -> StateSpacesConfig:
    dim = size("dim", [("token_emb.weight", 1), ("to_logits.weight", 1), (L + "to_u.0.weight", 1)])
    H = size("dss_kernel_H", [(L + "dss.C_real", 0), (L + "to_v.0.weight", 0), (L + "to_gate.weight", 1)])
    N = size("dss_kernel_N", [(L + "dss.C_real", 1), (L + "dss.C_imag", 1)])
    return StateSpacesConfig(num_tokens=_vocab(size), dim=dim, depth=depth, dss_kernel_N=N, dss_kernel_H=H,
                             dim_expansion_factor=_factor(size, dim), max_seq_len=max_seq_len,
                             dss_kernel_lambda_imag_exp=options.get("dss_kernel_lambda_imag_exp", True))


def _mhesa_config(size: SizeReader, depth: int, max_seq_len: int, options: dict) -> ExponentialSmoothingConfig:
    dim = size("dim", [("token_emb.weight", 1), ("to_logits.weight", 1), (L + "to_u.0.weight", 1)])
    width = size("dim_mhesa", [(L + "to_v.0.weight", 0), (L + "to_gate.weight", 1)])
    heads = size("heads", [(L + "mhesa.alphas", 0), (L + "mhesa.dampen_factors", 0)])
    if width % heads:
        raise ValueError(f"dim_mhesa={width} (from layers.*.to_v.0.weight) is not divisible by heads={heads} "
                         "(from layers.*.mhesa.alphas)")
    return ExponentialSmoothingConfig(num_tokens=_vocab(size), dim=dim, depth=depth, heads=heads, dim_mhesa=width,
                                      dim_expansion_factor=_factor(size, dim), max_seq_len=max_seq_len)


def _vocab(size: SizeReader) -> int:
    return size("num_tokens", [("token_emb.weight", 0), ("to_logits.weight", 0)])


def _factor(size: SizeReader, dim: int) -> float:
    hidden = size("the hidden width", [(L + "to_u.0.weight", 0), (L + "to_gate.weight", 0), (L + "to_out.weight", 1)])
    return expansion_factor(hidden, dim)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("dsconv", DsConvConfig, GatedDsConvLM, "dsconv", _dsconv_config),
        # one channel per head (head_dim 1): the direct form's Toeplitz matrices cost more than the products they
        # feed, so monarch wins from 16 tokens (forward 2.5 ms against 2.6 at 16, 16 against 46 at 128); decoding
        # runs a one-token step and sends every longer call to prefill (StateSpacesConfig.step_tokens)
        Family("gss", StateSpacesConfig, GatedStateSpacesLM, "dss", _gss_config, auto_forms={"onnx": "monarch"}),
        Family("mhesa", ExponentialSmoothingConfig, GatedExponentialSmoothingLM, "mhesa", _mhesa_config),
    )
}
BY_MIXER = {f.mixer: f for f in FAMILIES.values()}


def family_of(model_or_config) -> Family:
    """The family entry of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES[config.family]


__all__ = [
    "FAMILIES", "BY_MIXER", "Family", "family_of", "GatedLM",
    "DsConvConfig", "GatedDsConvLM", "StateSpacesConfig", "GatedStateSpacesLM",
    "ExponentialSmoothingConfig", "GatedExponentialSmoothingLM",
]
