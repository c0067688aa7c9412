"""gss-serve: an OpenAI-compatible HTTP server with continuous batching over the torch-free decoder.

`engine` (the step loop; numpy and onnxruntime only), `protocol` (OpenAI's request, checked),
`app` (FastAPI), `guard` (API keys and request limits, before any route), `metrics` (Prometheus),
`ray_app` (the same server as replicas on Ray Serve) and
`cli` (the gss-serve command). Needs the `server` extra; Ray Serve needs `serve`.
"""
