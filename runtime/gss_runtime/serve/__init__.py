"""gss-serve: an OpenAI-compatible HTTP server with continuous batching over the torch-free decoder.

`engine` (the step loop; numpy and onnxruntime only) with `requests` (what it is asked and tells back)
and `budget` (what a request's decoder state can cost); `protocol` (OpenAI's and vLLM's requests,
checked); `app` (FastAPI: routes and lifecycle) with `completions` (completion objects, log-probabilities,
streams) and `tokenization` (vLLM's tokenizer endpoints); `guard` (API keys and body limits, before any
route), `strict_json` (bodies as strict JSON) and `http_limits` (the request head, in uvicorn's
protocol); `metrics` (Prometheus); `ray_app` (the same server as replicas on Ray Serve) and `cli` (the
gss-serve command). Needs the `server` extra; Ray Serve needs `serve`.
"""
