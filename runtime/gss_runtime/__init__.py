"""Torch-free runtime for models exported by gss-export: full-sequence logits and generation."""

from .decoder import Decoder, DecoderState, RecurrentState
from .errors import RuntimeInputError
from .generate import Generation, Generator, Sampling, TextGeneration
from .runner import GSSRunner

__all__ = ["Decoder", "DecoderState", "RecurrentState", "Generation", "Generator", "GSSRunner", "RuntimeInputError", "Sampling",
           "TextGeneration"]
