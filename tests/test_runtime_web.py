"""runtime/web (onnxruntime-web in headless Chromium) against upstream eager, text through an export's tokenizer
(@huggingface/tokenizers) against Python's `tokenizers`; errors shown in the page."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import LANG_NEW, LANG_PROMPT, LONG_PROMPT, eager_greedy, family_upstream, require, prompt_path
from text_support import EOS, eager_greedy_ids, text_export, tokenizer_folder

WEB_DIR = Path(__file__).resolve().parent.parent / "runtime" / "web"
CHROMIUM = Path("/usr/bin/chromium")
FAMILIES = ("gss", "mhesa")  # the recurrent ones, beside the example's dsconv


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, once the page's packages and Chromium are installed (session scope: skips before the export)."""
    require(None not in (shutil.which("node"), shutil.which("npm")), "node/npm not found: install Node.js 20+ with npm")
    require(all((WEB_DIR / "node_modules" / p).is_dir() for p in ("onnxruntime-web", "playwright-core", "@huggingface/tokenizers")),
            "runtime/web's packages are missing or out of date: run `npm ci --prefix runtime/web`")
    require(CHROMIUM.is_file(), f"{CHROMIUM} not found: run `apt-get install -y chromium` (Debian)")
    return shutil.which("node")


def serve(model_dir: Path):
    """The page served on 127.0.0.1 (any free port) by runtime/web/serve.py, model_dir at /model/; yields its URL."""
    spec = importlib.util.spec_from_file_location("gss_web_serve", WEB_DIR / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    server = serve.make_server(model_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/web/?model=/model/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def page_url(node, example_onnx):
    """The page with the exported example at /model/."""
    yield from serve(example_onnx)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_page_url(node, family_exports, family):
    """The page with the small `family` export at /model/."""
    yield from serve(family_exports(family, "onnx"))


def drive(node: str, url: str, screenshot: Path, *args: str) -> dict:
    proc = subprocess.run([node, WEB_DIR / "test" / "drive.mjs", url, screenshot, *args],
                          capture_output=True, text=True, timeout=300, cwd=WEB_DIR)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def drive_runs(node: str, runs: list[dict], tmp_path: Path) -> list[dict]:
    """Several runs in one browser session (drive.mjs --runs): a page load each; their results in order."""
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    proc = subprocess.run([node, WEB_DIR / "test" / "drive.mjs", "--runs", tmp_path / "runs.json"],
                          capture_output=True, text=True, timeout=300, cwd=WEB_DIR)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{path}: not a real screenshot"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600


def test_web_page_greedy_matches_eager(node, page_url, lang_reference, tmp_path):
    shot = tmp_path / "web_generate.png"
    result = drive(node, page_url, shot, "--prompt", bytes(LANG_PROMPT).decode(), "--max-new-tokens", str(LANG_NEW))
    assert result["state"] == "done", result["status"]
    assert result["tokens"] == lang_reference
    assert set(range(1, LANG_NEW + 1)) <= set(result["counts"])  # each token was shown as it came
    assert result["text"] == bytes(LANG_PROMPT + lang_reference).decode("utf-8", "replace")
    assert result["errors"] == []
    assert result["prompt"] == "step" and result["family"] == "dsconv"
    check_png(shot)


def test_web_page_long_prompt_goes_through_prefill(node, page_url, long_reference, tmp_path):
    """A 300-byte prompt: prefill.onnx in one call, then steps; the same tokens as eager."""
    result = drive(node, page_url, tmp_path / "web_long.png", "--prompt", ",".join(map(str, LONG_PROMPT)), "--ids",
                   "--max-new-tokens", str(LANG_NEW))
    assert result["state"] == "done", result["status"]
    assert result["tokens"] == long_reference and result["prompt"] == "prefill"


def test_web_page_family_greedy_matches_eager(family, family_page_url, node, family_references, tmp_path):
    """A recurrent family's state (replaced by each call, read from config.json): the same tokens as eager."""
    result = drive(node, family_page_url, tmp_path / f"web_{family}.png", "--prompt", bytes(LANG_PROMPT).decode(),
                   "--max-new-tokens", str(LANG_NEW))
    assert result["state"] == "done", result["status"]
    assert result["tokens"] == family_references[family]
    assert set(range(1, LANG_NEW + 1)) <= set(result["counts"])
    assert result["errors"] == []
    assert result["prompt"] == prompt_path(family, len(LANG_PROMPT)) and result["family"] == family


def test_web_page_family_long_prompt_goes_through_prefill(family, family_page_url, node, tmp_path):
    result = drive(node, family_page_url, tmp_path / f"web_{family}_long.png", "--prompt", ",".join(map(str, LONG_PROMPT)),
                   "--ids", "--max-new-tokens", str(LANG_NEW))
    assert result["state"] == "done", result["status"]
    assert result["tokens"] == eager_greedy(family_upstream(family), LONG_PROMPT, LANG_NEW)
    assert result["prompt"] == "prefill" and result["family"] == family


# the checks themselves are shared with generate.js (tested there): here, that the page shows them
@pytest.mark.parametrize("args, message", [
    (["--ids", "--prompt", "1, 300"], "ids must be in [0, 256)"),
    (["--prompt", "ab", "--max-new-tokens", "0"], "max new tokens must be a positive integer"),
])
def test_web_page_shows_bad_input(args, message, node, page_url, tmp_path):
    result = drive(node, page_url, tmp_path / "web_error.png", *args)
    assert result["state"] == "error" and message in result["status"], result


def test_web_page_reports_a_missing_model(node, page_url, tmp_path):
    result = drive(node, page_url.replace("model=/model/", "model=/nowhere/"), tmp_path / "web_missing.png", "--prompt", "a")
    assert result["state"] == "error" and "cannot load config.json" in result["status"] and "404" in result["status"]


# ---- text through the export's tokenizer (gss-export --tokenizer) ----------------------------------------
TEXT_FAMILIES = ("dsconv", "mhesa")  # one of each kind of state (appended, replaced)
TEXT_PROMPTS = ("café 日本", "🙂 emoji")  # multi-byte characters: single tokens end inside them
TEXT_NEW = 24


def text_models(tmp_path_factory, root: Path):
    """Under `root` (served at /model/): each text family's export, a copy of mhesa's whose eos token is one that
    greedy decoding reaches after the first prompt ("eos"), and one without a tokenizer ("ids": ids only). Returns
    Python's `tokenizers` reading the exports' tokenizer, and that eos token's id."""
    from tokenizers import Tokenizer

    root.mkdir()
    for family in TEXT_FAMILIES:
        (root / family).symlink_to(text_export(tmp_path_factory, family), target_is_directory=True)
    tok = Tokenizer.from_file(str(tokenizer_folder(tmp_path_factory) / "tokenizer.json"))
    full = eager_greedy_ids("mhesa", tok.encode(TEXT_PROMPTS[0]).ids, TEXT_NEW)
    stop = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    for name in ("eos", "ids"):
        shutil.copytree(root / "mhesa", root / name)
        config = json.loads((root / name / "config.json").read_text())
        if name == "ids":
            for file in config["tokenizer"]["files"]:
                (root / name / file).unlink()
            config["tokenizer"] = None
        else:
            config["tokenizer"].update(eos_token=tok.id_to_token(full[stop]), eos_token_id=full[stop])
            (root / name / "tokenizer_config.json").write_text(
                json.dumps({**json.loads((root / name / "tokenizer_config.json").read_text()), "eos_token": tok.id_to_token(full[stop])}))
        (root / name / "config.json").write_text(json.dumps(config))
    return tok, full[stop]


def test_web_page_text_greedy_matches_eager_decoded(node, tmp_path_factory, tmp_path):
    """One browser session: for two families, with prompts of multi-byte characters, the page encodes the text
    with the export's tokenizer, makes upstream eager's greedy ids (stopping at the tokenizer's eos) and streams
    their text as Python's `tokenizers` decodes it, never changing text it showed; a tokenizer whose eos token
    greedy decoding reaches stops there; a model of ids only takes and shows ids, and refuses text."""
    tok, eos_id = text_models(tmp_path_factory, tmp_path / "models")
    # a prompt per family (both prompts covered; test_runtime_node.py runs each family with both)
    cases = [(family, prompt, tok.token_to_id(EOS)) for family, prompt in zip(TEXT_FAMILIES, TEXT_PROMPTS)]
    cases.append(("eos", TEXT_PROMPTS[0], eos_id))
    server = serve(tmp_path / "models")
    url = next(server).replace("model=/model/", "model=/model/{}/")
    try:
        runs = [{"url": url.format(name), "prompt": prompt, "maxNewTokens": TEXT_NEW} for name, prompt, _ in cases]
        runs.append({"url": url.format("ids"), "prompt": "1, 2, 3", "ids": True, "maxNewTokens": 8})
        runs.append({"url": url.format("ids"), "prompt": "café", "maxNewTokens": TEXT_NEW})
        runs[0]["screenshot"] = str(tmp_path / "web_text.png")
        results = drive_runs(node, runs, tmp_path)
    finally:
        next(server, None)
    for (name, prompt, eos), result in zip(cases, results):
        family = "mhesa" if name == "eos" else name
        prompt_ids = tok.encode(prompt, add_special_tokens=True).ids
        want = eager_greedy_ids(family, prompt_ids, TEXT_NEW, eos)
        text = tok.decode(want, skip_special_tokens=True)
        assert result["state"] == "done", (name, result["status"])
        assert result["tokens"] == want, (name, prompt)
        assert result["generated"] == text and result["text"] == tok.decode(prompt_ids, skip_special_tokens=True) + text
        assert all(text.startswith(shown) for shown in result["texts"]), result["texts"]  # shown text never changes
        assert set(range(1, len(want) + 1)) <= set(result["counts"])  # each token was shown as it came
        assert (result["vocabulary"], result["family"], result["errors"]) == ("tokenizer", family, [])
        assert result["stop"] == ("max_new_tokens" if len(want) == TEXT_NEW else "eos")
    assert results[len(cases) - 1]["stop"] == "eos" and len(results[len(cases) - 1]["tokens"]) < TEXT_NEW
    ids_only = results[-2]  # ids in, ids out
    assert (ids_only["state"], ids_only["vocabulary"], ids_only["stop"]) == ("done", "ids", "max_new_tokens"), ids_only["status"]
    assert ids_only["tokens"] == eager_greedy_ids("mhesa", [1, 2, 3], 8)
    assert ids_only["generated"] == "".join(f" {t}" for t in ids_only["tokens"])
    assert results[-1]["state"] == "error" and "enter the prompt as token ids" in results[-1]["status"], results[-1]
    check_png(tmp_path / "web_text.png")
