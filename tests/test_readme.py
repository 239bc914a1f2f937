"""The README and the user guide in docs/: the quick start runs as written, and what the pages quote is real.

* The ```bash blocks of the README's "Quick start" section run as written, with ``set -e``, from the repository
  root (slow: ``make demo`` runs the demo, a minute or two). A ``make test`` line is documentation here: this test
  runs inside ``make test``, so running it would recurse; it is skipped, and the skip is said in the output.
* Every relative link of README.md and docs/*.md resolves (file, and heading anchor for Markdown targets); the
  README links every docs page from its table of contents and stays short.
* Every repository path the pages quote in backticks exists; the ViT rows of the models table in
  docs/concepts.md match the models built from their configs; every measured-looking number (a time, a size, a
  rate, a speed-up) appears in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
BENCHMARKS = ROOT / "BENCHMARKS.md"
VENV_STAMP = ".venv/.hctembed-installed"  # the Makefile's STAMP: present and newer than pyproject.toml = installed
README_MAX_LINES = 150
OUTPUTS = ("benchmarks/results/",)  # written by the benchmark scripts, git-ignored
TRACE = "+[readme] "  # PS4: bash prints each top-level command of the blocks after this (nested levels: "++[...")
MAKE_TEST = re.compile(r"^\s*make\s+test(\s|$)")
MAKE_LINE = re.compile(r"^\s*make(\s|$)")
FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.M | re.S)
BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"`((?:hctembed|tests|benchmarks|docs|\.ci)/[^`\s]*)`")
# a number with a unit of time, size, rate or speed-up: what only a measurement can give
MEASURED = re.compile(
    r"(?<![\w.])~?(\d[\d,]*(?:\.\d+)?)(?:[–-](\d[\d,]*(?:\.\d+)?))?\s?"
    r"(ms|s|seconds?|min|minutes?|h|hours?|days?|KB|MB|GB|TB|GFLOP/s|GFLOP|TFLOP/s|scans/s|CPU-seconds|core-seconds|×)"
    r"(?![\w/])"
)
# numbers with those units that are settings, not measurements (each with where it is set)
SETTINGS = {
    "3 days",  # the gloo barrier timeout of a sharded embedding run (workflows/shards.py)
}


def without_code_blocks(markdown: str) -> str:
    return FENCE.sub("", markdown)


def section(markdown: str, title: str) -> str:
    """The text of the level-2 section ``## title`` up to the next level-1 or level-2 heading."""
    found = re.search(rf"^## {re.escape(title)}[ \t]*$(.*?)(?=^##? |\Z)", markdown, re.M | re.S)
    assert found, f"README.md has no '## {title}' section"
    return found.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)[ \t]*$", without_code_blocks(markdown), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def relative_links(markdown: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", without_code_blocks(markdown))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/ (limit {README_MAX_LINES})"
    contents = section(text, "User guide")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(contents)}
    missing = [p.relative_to(ROOT).as_posix() for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README's user guide table does not link {missing}"
    assert "[Quick start](#quick-start)" in text and "[User guide](#user-guide)" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_repository_paths_exist(page):
    missing = []
    for path in REPO_PATH.findall(page.read_text()):
        if any(c in path for c in "<>{}*…") or path.startswith(OUTPUTS):  # a pattern, or what a script writes
            continue
        if not (ROOT / path.rstrip(".,;:")).exists():
            missing.append(path)
    assert not missing, f"{page.name} quotes paths that do not exist: {missing}"


def test_vit_rows_of_the_models_table_match_the_models():
    torch = pytest.importorskip("torch")
    from hctembed.config import VIT_PRESETS
    from hctembed.model.vit3d import ViT3D

    rows = re.findall(
        r"^\| `(vit-[a-z]+)`[^|]*\|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|", (ROOT / "docs/concepts.md").read_text(), re.M
    )
    assert {r[0] for r in rows} == set(VIT_PRESETS), "docs/concepts.md's models table lists every ViT preset"
    for name, arch, model_input, patches, params in rows:
        c = VIT_PRESETS[name]
        with torch.device("meta"):
            n = sum(p.numel() for p in ViT3D(c).parameters())
        assert [int(x) for x in re.findall(r"\d+", arch)[:4]] == [c.dim, c.depth, c.heads, c.mlp_dim], name
        assert [int(x) for x in re.findall(r"\d+", model_input)] == [c.in_channels, c.image_size], name
        assert [int(x) for x in re.findall(r"\d+", patches)] == [c.num_patches, c.patch_size], name
        assert params.strip() == f"{n / 1e6:.1f} M", f"{name}: {params.strip()} in the table, {n / 1e6:.1f} M built"


def _benchmark_numbers() -> set[str]:
    return {m.replace(",", "") for m in re.findall(r"\d[\d,]*(?:\.\d+)?", BENCHMARKS.read_text())}


def _reported(number: str, known: set[str]) -> bool:
    """``number`` is in BENCHMARKS.md as written, or is one of its numbers rounded to as many decimals."""
    plain = number.replace(",", "")
    decimals = len(plain.partition(".")[2])
    return plain in known or any(round(float(k), decimals) == float(plain) for k in known)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_measured_numbers_come_from_benchmarks(page):
    """A time, size, rate or speed-up quoted in the guide is one BENCHMARKS.md reports (rounded as written)."""
    known = _benchmark_numbers()
    text = re.sub(r"`[^`\n]*`", "", without_code_blocks(page.read_text()))
    unknown = []
    for m in MEASURED.finditer(text):
        if m.group(0).lstrip("~") in SETTINGS:
            continue
        if not all(_reported(number, known) for number in filter(None, m.group(1, 2))):
            unknown.append(m.group(0))
    assert not unknown, (
        f"{page.name} quotes {unknown}, not found in BENCHMARKS.md (measure it there, or say it in words)"
    )


def _hits(output: str) -> int:
    """Hits in ``hctembed search`` output: JSON lines, or table rows whose first cells are a rank and a score."""
    count = 0
    for line in output.splitlines():
        if line.startswith("{"):
            count += "scan_id" in json.loads(line)
            continue
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) >= 3 and cells[0].isdigit() and re.fullmatch(r"-?\d+\.\d+", cells[1]):
            count += 1
    return count


def _segments(output: str) -> list[tuple[str, str]]:
    """(command, its output) for each top-level command bash traced."""
    segments: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith(TRACE):
            segments.append((line[len(TRACE) :], []))
        elif segments:
            segments[-1][1].append(line)
    return [(cmd, "\n".join(lines)) for cmd, lines in segments]


@pytest.mark.slow
def test_readme_quick_start_runs_as_written():
    quick_start = section(README.read_text(), "Quick start")
    blocks = BASH_BLOCK.findall(quick_start)
    assert blocks, "the README's quick start has no ```bash block"
    lines, skipped = [], []
    for line in "".join(blocks).splitlines():
        if MAKE_TEST.match(line):  # documentation here: this test runs inside `make test`
            skipped.append(line.strip())
            lines.append(f"echo 'skipped by tests/test_readme.py (it runs inside make test): {line.strip()}'")
        else:
            lines.append(line)
    if any(MAKE_LINE.match(line) for line in lines):
        stale = subprocess.run(["make", "-q", VENV_STAMP], cwd=ROOT, capture_output=True).returncode != 0
        if stale:
            pytest.skip(
                f"{VENV_STAMP} is missing or older than pyproject.toml: `make demo` would install first; run it"
            )
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv_bin)
    # trace each command so that its output can be told apart (PS4 set in the script: bash running as root
    # ignores it from the environment); the commands themselves run as written
    script = f"PS4='{TRACE}'\nset -ex\n" + "\n".join(lines) + "\n"
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - start
    tail = "\n".join(done.stdout.splitlines()[-60:])
    assert done.returncode == 0, f"the quick start failed (exit {done.returncode}) after {seconds:.0f} s:\n{tail}"
    searches = [(cmd, out) for cmd, out in _segments(done.stdout) if re.match(r"^(\S*/)?hctembed search\b", cmd)]
    assert searches, "the quick start shows no `hctembed search`"
    for cmd, out in searches:
        k = re.search(r"(?:^|\s)(?:-k|--k)[ =](\d+)", cmd)
        expected = int(k.group(1)) if k else 10
        assert _hits(out) == expected, f"`{cmd}` named {_hits(out)} hits, not {expected}:\n{out}"
    prose = re.sub(r"<!--.*?-->", "", quick_start, flags=re.S)
    quoted = set(re.findall(r"`((?:demo-out|\.venv)(?:/[^`\s.][^`\s]*)?)`", prose))
    missing = sorted(p for p in quoted if not (ROOT / p).exists())
    assert not missing, f"the quick start names files the demo did not leave: {missing}"
    print(f"quick start ran in {seconds:.0f} s; skipped: {skipped or 'nothing'}")
