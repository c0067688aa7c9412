"""A small byte-level corpus every Python install has: the bundled pydoc topic texts.

The corpus and its train / held-out split live in the package (`gss_export.corpus`), so the
installed `gss-export` can check fp16 / int8 exports on the held-out split without this folder;
this module keeps the examples' import path.
"""
from __future__ import annotations

from gss_export.corpus import HELDOUT_FRACTION, corpus_bytes, load_corpus

__all__ = ["HELDOUT_FRACTION", "corpus_bytes", "load_corpus"]
