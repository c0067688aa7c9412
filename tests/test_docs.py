"""The documentation: the MkDocs site builds strictly, and every repository path the docs name exists.

`mkdocs build --strict` fails on a broken link or anchor, a page missing from the nav, or an API
reference (mkdocstrings) that no longer resolves. Files of the repository are named in the pages as
inline code paths (the built site does not contain them, so they cannot be links there): those are
checked here against the tree, with the README's and benchmarks/README.md's relative links, so a moved
module shows up as a failing test rather than a stale page.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
INSTALL = 'pip install -e ".[docs]"'
# inline code that names a file or folder of the repository
REPO_PATH = re.compile(r"`((?:gss_export|runtime|benchmarks|tests|examples|docs|\.ci)/[^`\s]*)`")
TEST_FILE = re.compile(r"`(test_[A-Za-z0-9_]+\.py)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# made by a tool, not in the repository: npm's packages
GENERATED = ("runtime/web/node_modules", "runtime/node/node_modules")


def test_site_builds_strictly(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if importlib.util.find_spec(m.split(".")[0]) is None]
    require(not missing, f"the documentation tools are not installed ({', '.join(missing)}): {INSTALL}")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for page in ("index", "exporting", "runtime", "serving", "languages", "benchmarks", "reliability", "convolution",
                 "api/runtime", "api/export"):
        assert (site / page / "index.html" if page != "index" else site / "index.html").is_file(), f"no {page} page"
    api = (site / "api" / "runtime" / "index.html").read_text()
    for name in ("GSSRunner", "Decoder", "Generator", "Sampling"):
        assert f'id="gss_runtime.{name}"' in api, f"gss_runtime.{name} is missing from the API reference"
    assert 'id="gss_export.export.export_model"' in (site / "api" / "export" / "index.html").read_text()


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]


def test_paths_the_docs_name_exist():
    stale = []
    for page in _pages():
        text = page.read_text()
        for path in REPO_PATH.findall(text):
            if any(c in path for c in "*<{…") or path.startswith(GENERATED):
                continue  # a pattern or a placeholder, not one file
            if not (ROOT / path.rstrip("/")).exists():
                stale.append(f"{page.relative_to(ROOT)}: `{path}`")
        for name in TEST_FILE.findall(text):
            if not (ROOT / "tests" / name).exists():
                stale.append(f"{page.relative_to(ROOT)}: `{name}` (in tests/)")
    assert not stale, "the docs name paths that do not exist:\n  " + "\n  ".join(stale)


def test_readme_links_resolve():
    """GitHub renders the READMEs from the tree: their relative links must point at files that exist."""
    broken = []
    for readme in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        for target in MARKDOWN_LINK.findall(readme.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (readme.parent / target.split("#")[0]).exists():
                broken.append(f"{readme.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links:\n  " + "\n  ".join(broken)
