"""The causal convolution at the heart of every family, in each form it can take, and how each form reaches ONNX.

Every form computes the same linear causal convolution, out[b, j] = sum_{m<=j} u[b, m] * K[b, j - m]
(per head), holds no parameters and can be swapped on a loaded model; they differ in cost and in
what each export target can keep symbolic in the sequence length:

- `forms`: the forms as torch functions and modules (direct/Toeplitz, fft, fft2n, monarch, upstream's
  own), the names each target's `auto` resolves to, the custom ops the exporter sees for the fft and
  monarch forms, and the decoder's pieces (the step's direct read of the past, the prefill's inputs).
- `monarch`: the monarch form itself, the DFT as three small matrix products (block sizes from n).
- `onnx_fft`, `onnx_monarch`: the ONNX translations of the fft and monarch custom ops, their sizes
  computed in-graph from the sequence length, so one file serves every length.
- `length_switch`: ONNX `auto`, two exports of the same weights joined under an `If` on the length
  (direct up to `forms.SWITCH_LENGTH` tokens, monarch above), the shared weights stored once.

Nothing is imported here: `from gss_export.conv.forms import make_conv` loads the forms, not the ONNX side.
"""
