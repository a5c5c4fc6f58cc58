"""README.md and docs/*.md, checked as a reader would use them.

* Every relative link (``[text](path)``, ``[text](path#anchor)``,
  ``[text](#anchor)``, images included; not ``http(s)://`` or ``mailto:``)
  resolves to an existing file or folder, and an ``#anchor`` to a heading of
  that file, with GitHub's heading slugs.
* Every ```` ```python ```` block runs: the blocks of one page in order, in one
  namespace (as a reader pastes them), in a fresh process with the repository
  root as the working directory and ``JAX_PLATFORMS=cpu``. Blocks that would
  download or train for long are ```` ```text ```` or shell blocks instead.
* The two fresh-machine commands sit where ``.ci/run`` reads them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import COMPILE_CACHE_ENV, ROOT

DOCS = ("index", "models", "training", "weights", "evaluation", "accelerators")
DOCS += ("reliability", "paper", "benchmarks")
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def split_fences(text: str) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The lines outside fenced code (fenced lines blanked, so numbers stay) and
    the fenced blocks as ``(info, first code line number, code)``."""
    prose, blocks = [], []
    fence = None  # (marker, info, first line, lines)
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = (m.group(1), m.group(2), number + 1, [])
                prose.append("")
            else:
                prose.append(line)
            continue
        marker, info, first, lines = fence
        if m and m.group(1)[0] == marker[0] and len(m.group(1)) >= len(marker) and not m.group(2):
            blocks.append((info, first, "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
        prose.append("")
    assert fence is None, f"a code fence opened at line {fence[2] - 1} is never closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lower-cased, punctuation dropped
    (letters, digits, '_', '-' and spaces stay), spaces turned into '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    """Every heading anchor of a page; repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(read(page))[0]:
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: str) -> list[tuple[int, str]]:
    """(line, target) of every link outside code that is not a URL."""
    links = []
    for number, line in enumerate(split_fences(read(page))[0], 1):
        for m in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = m.group(1)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                links.append((number, target))
    return links


def python_blocks(page: str) -> list[tuple[str, int, str]]:
    return [
        (page, first, code) for info, first, code in split_fences(read(page))[1] if info == "python"
    ]


def test_the_pages_exist_and_the_index_lists_them():
    index = read(os.path.join("docs", "index.md"))
    for name in DOCS:
        assert os.path.join("docs", f"{name}.md") in PAGES, f"docs/{name}.md is missing"
        if name != "index":
            assert f"]({name}.md)" in index, f"docs/index.md does not link {name}.md"
    assert len(read("README.md").splitlines()) <= 300, "README.md is over 300 lines"


def test_slugs_are_githubs():
    assert (
        slug("Options of `create_model(name, **options)`") == "options-of-create_modelname-options"
    )
    assert (
        slug("tf.data or grain (issue 12's designs a and b)")
        == "tfdata-or-grain-issue-12s-designs-a-and-b"
    )
    assert slug("Recipes (`configs/`)") == "recipes-configs"
    assert slug("In a Flax NNX program") == "in-a-flax-nnx-program"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    here = os.path.dirname(os.path.join(ROOT, page))
    broken = []
    for number, target in relative_links(page):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            broken.append(f"{page}:{number}: {target} (no such file)")
        elif anchor and (os.path.isdir(full) or anchor not in anchors(os.path.relpath(full, ROOT))):
            broken.append(f"{page}:{number}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_the_fresh_machine_commands_are_where_ci_reads_them():
    """``.ci/run`` takes the line two after ``<!-- test-command -->`` and runs
    what follows its last '&& '; the main command has the same form."""
    lines = read("README.md").splitlines()
    for marker, tail in (
        ("<!-- main-command -->", "python train.py "),
        ("<!-- test-command -->", "python -m pytest "),
    ):
        assert lines.count(marker) == 1, f"README.md must hold {marker} once"
        i = lines.index(marker)
        assert lines[i + 1] == "```" and lines[i + 3] == "```", (
            f"a bare ``` fence around one line after {marker}"
        )
        command = lines[i + 2]
        assert command.startswith(
            "python3 -m venv .venv && . .venv/bin/activate && pip install -r "
        )
        assert command.rsplit("&& ", 1)[1].startswith(tail), command


_RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
for page, first, code in json.load(sys.stdin):
    exec(compile("\\n" * (first - 1) + code, page, "exec"), ns)
"""


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run(page):
    """A page's python blocks, in order, in one namespace, in a fresh process:
    tracebacks name the page and its line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # A reader's machine has one CPU device, not the 8 this test session simulates.
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    # The session's compilation cache (tests/conftest.py), as train.py's test
    # runs get it: the pages build the same small networks, which compile once.
    if os.environ.get(COMPILE_CACHE_ENV):
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ[COMPILE_CACHE_ENV]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(python_blocks(page)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"a python block of {page} failed:\n{out.stderr[-4000:]}"
