"""The README and docs/*.md cannot rot: every ```python block runs, the rest are marked.

Each page's python blocks run in order in one namespace, in a fresh process whose working
directory is a temporary folder (the blocks write files there), on tiny models built from
config, offline. A block that cannot run here carries a marker on the line before it:

    <!-- doc-test: skip (needs network: downloads a checkpoint) -->

with the reason in brackets. Blocks of other languages (bash, ...) must carry one too, except
```text blocks (trees and sample output, not code). A python block that raises fails the
test, naming the page, the block's line and the traceback.

The Layout section of the README is checked against the tree: every module under tf_lora/
(except __init__.py / __main__.py) is named there and every path named there exists.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
MARKER = re.compile(r"^<!--\s*doc-test:\s*skip\s*\((?P<reason>[^)]+.*)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")


def _blocks(page):
    """(language, first line number, source, skip reason or None) for each fenced block."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group("lang") or "(none)"
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{start + 1}: code block never closed")
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = MARKER.match(lines[prev].strip()) if prev >= 0 else None
        blocks.append((lang, start + 1, "\n".join(lines[start + 1:j]), marker.group("reason") if marker else None))
        i = j + 1
    return blocks


def test_pages_found():
    assert "README.md" in PAGES and len(PAGES) > 1, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_markers_are_well_formed(page):
    """Every `doc-test` comment is a skip marker with a reason, directly before a code block."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    marked_fences = {line for _, line, _, reason in _blocks(page) if reason}  # 1-based
    for n, line in enumerate(lines, 1):
        if "doc-test" not in line:
            continue
        assert MARKER.match(line.strip()), f"{page}:{n}: malformed marker {line!r}"
        following = n
        while following < len(lines) and not lines[following].strip():
            following += 1
        assert following + 1 in marked_fences, f"{page}:{n}: marker not followed by a code block"


@pytest.mark.parametrize("page", PAGES)
def test_every_non_python_block_is_marked(page):
    unmarked = [f"{page}:{line} ({lang})" for lang, line, _, reason in _blocks(page)
                if lang not in ("python", "text") and reason is None]
    assert not unmarked, f"code blocks neither run nor marked: {unmarked}"


_RUNNER = textwrap.dedent("""
    import sys, traceback
    blocks = {blocks!r}
    namespace = {{"__name__": "__main__"}}
    for line, source in blocks:
        print(f"--- {page}:{{line}}", flush=True)
        try:
            exec(compile(source, f"{page}:{{line}}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"DOC BLOCK FAILED: {page}, the block at line {{line}}", flush=True)
            sys.exit(1)
""")


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, tmp_path):
    blocks = [(line, source) for lang, line, source, reason in _blocks(page) if lang == "python" and reason is None]
    if not blocks:
        pytest.skip(f"{page} has no runnable python block")
    script = tmp_path / "run_blocks.py"
    script.write_text(_RUNNER.format(blocks=blocks, page=page))
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{page}: a python block failed\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def _layout_section():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    return m.group(1)


def _named_paths(section):
    """Paths named in the Layout section: `dir/file.py` tokens, and `a.py, b.py` after one with a folder."""
    names = set()
    for line in section.split("\n"):
        folder = None
        for token in re.findall(r"[\w./]+\.py\b|[\w./]+/(?=\s|$|,)", line):
            if "/" in token:
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                names.add(token)
            elif folder:
                names.add(folder + token)
    return names


def test_layout_names_every_module():
    named = _named_paths(_layout_section())
    modules = set()
    for directory, _, files in os.walk(os.path.join(ROOT, "tf_lora")):
        if "__pycache__" in directory:
            continue
        for name in files:
            if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
                modules.add(os.path.relpath(os.path.join(directory, name), ROOT).replace(os.sep, "/"))
    missing = sorted(modules - named)
    assert not missing, f"modules not named in README.md's Layout section: {missing}"


def test_layout_paths_exist():
    named = _named_paths(_layout_section())
    absent = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not absent, f"README.md's Layout section names paths that do not exist: {absent}"


def _anchors(path):
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    """Links to files of the repository point at files that exist, and #anchors at headings that exist."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(os.path.join(ROOT, page))
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = os.path.join(base, target) if target else os.path.join(ROOT, page)
        if not os.path.exists(path):
            broken.append(target)
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page}: links to missing files or headings: {broken}"
