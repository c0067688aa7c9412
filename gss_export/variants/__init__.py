"""The fp16 and int8 variants of an ONNX export: what is asked for, how the files are built, how they are checked.

A float32 export is checked against eager PyTorch within a tolerance; a reduced-precision one cannot
be, so it is checked on held-out text instead (top-1 agreement and KL divergence against float32 eager).

- `request`: `VariantRequest`, what the CLI or a caller asks for (`--dtype fp16`, `--quantize int8`
  and their options). `export.export_model` hands it the float32 graphs to write (`save`) and the
  staged files to check (`check`); `describe` says what each file computes in reduced precision.
- `build`: the variant of a float32 ONNX graph, built with onnxruntime's own tools (its float16
  converter; `quant_pre_process` and `quantize_dynamic` for int8), and the record of what it did.
- `int8_products`: int8 weight products with one activation scale per row, and the CPU probe that
  sets the int8 weight range (full on VNNI, [-64, 64] on AVX2).
- `quality`: the held-out text and the quality check (`QualityReport`).

Nothing is imported here, and neither `export` nor `targets` imports this package: a request carries
its own behaviour into the export, so the variants build on the targets and never the other way round.
"""
