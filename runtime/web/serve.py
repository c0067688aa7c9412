"""Serve the web page and a model folder on localhost: `python runtime/web/serve.py MODEL_DIR [--port 8000]`.

`/` is runtime/ (the page at /web/, the shared decoder at /js/), `/model/` is MODEL_DIR. Standard library
only; sets the MIME types browsers insist on (`text/javascript` for ES modules, `application/wasm`).
The tests use `make_server` too.
"""
from __future__ import annotations

import argparse
import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".data": "application/octet-stream"}


class Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}
    model_dir: Path

    def translate_path(self, path: str) -> str:
        if not path.startswith("/model/"):
            return super().translate_path(path)
        runtime, self.directory = self.directory, str(self.model_dir)  # resolve the rest inside model_dir
        try:
            return super().translate_path(path[len("/model"):])
        finally:
            self.directory = runtime

    def log_message(self, format, *args):  # quiet: one line per file is noise in test output
        pass


def make_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server (not yet started: call serve_forever) for runtime/ at / and model_dir at /model/; port 0: any free one."""
    handler = type("ModelHandler", (Handler,), {"model_dir": Path(model_dir).resolve()})
    return ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(RUNTIME)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a folder written by gss-export --format onnx")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not (Path(args.model_dir) / "decoder.onnx").is_file():
        sys.exit(f"error: {args.model_dir} has no decoder.onnx; export a model with gss-export first")
    server = make_server(args.model_dir, port=args.port)
    print(f"open http://127.0.0.1:{server.server_address[1]}/web/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
