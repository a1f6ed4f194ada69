"""The code in README.md and docs/*.md runs as written, and the commands it shows exist.

* Every ```python block runs.  The blocks of one file run in order in ONE fresh Python process
  started from the repository root (so a page can build on its earlier blocks, as a reader
  does); a block that raises fails the test with the page, the line and the traceback.
* A ```bash block runs when each of its commands is on the list of fast, side-effect-free
  commands below (``python -m comparisons --help``, ...) or when it follows a
  ``<!-- docs-test: run -->`` comment.  The commands of the other bash blocks are checked without
  running them: the harness's and the trainer's command lines must parse with the real argument
  parsers and use no deprecated option, ``make`` targets must exist, scripts and their options
  must exist.
* A block that cannot run in CI (a GPU, real data files, minutes of CPU) follows a
  ``<!-- docs-test: skip (the reason) -->`` comment.  Each one is reported as a skipped test
  with its reason, and there may be only a few.
* Relative links and images point to files (and headings) that exist.

The blocks run with one thread and the torch backend uncompiled unless the environment says
otherwise: compiling costs seconds per graph, more than these small examples compute, and the
compiled path has tests of its own (tests/ops).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: At most this many blocks may be skipped, over all the pages together.
MAX_SKIPPED_BLOCKS = 6
#: Seconds one page's blocks may take in all before the run is stopped.
PAGE_TIMEOUT = 600

RUN_LANGUAGES = {"python"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>[^>]*?)\s*-->\s*$")
SKIP = re.compile(r"skip\s*\((?P<reason>.+)\)$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")

#: Shell commands the test runs: fast (a few seconds), no files written, no network.
RUNNABLE_COMMANDS = [
    re.compile(r"^python -m comparisons( (run|mirman|theorem|report))? --help$"),
    re.compile(r"^python -m linf_plugin\.training (--help|--list-presets|--list-models)$"),
    re.compile(r"^python -m linf_plugin\.env( --short| --json)?$"),
]


@dataclass
class Block:
    path: Path
    line: int  # the line of the opening fence (1-based)
    lang: str
    code: str
    marker: Optional[str]  # the docs-test comment just before the block, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> Optional[str]:
        m = SKIP.match(self.marker or "")
        return m.group("reason").strip() if m else None


def read_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a Markdown file, with the docs-test marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, marker, i = [], None, 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            what = m.group("what")
            if what != "run" and not SKIP.match(what):
                raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: unknown marker {m.group(0)!r}; "
                                 "use <!-- docs-test: run --> or <!-- docs-test: skip (reason) -->")
            marker = what
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip() and marker is not None:
                raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: a docs-test marker must come right before "
                                 "a code block")
            i += 1
            continue
        indent, close = len(fence.group("indent")), fence.group("fence")
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != close:
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: code block never closed")
        blocks.append(Block(path, i + 1, fence.group("lang").lower(), "\n".join(body) + "\n", marker))
        marker, i = None, j + 1
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in read_blocks(p)]
SKIPPED = [b for b in ALL_BLOCKS if b.skip_reason is not None]


# ------------------------------------------------------------------------------- running python
_RUNNER = r"""
import json, sys, time
ns = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    start = time.perf_counter()
    # the newlines put the code at its own line of the page, so tracebacks name the page's line
    exec(compile("\n" * block["line"] + block["code"], block["file"], "exec"), ns)
    print(f"[docs-test] {block['file']}:{block['line']}: {time.perf_counter() - start:.1f} s", flush=True)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("LINF_LP_DIST_COMPILE", "0")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_python_blocks(blocks: List[Block], timeout: float = PAGE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``blocks`` in order in one fresh interpreter, from the repository root."""
    payload = [{"file": str(b.path.relative_to(ROOT)), "line": b.line, "code": b.code} for b in blocks]
    return subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(payload), capture_output=True,
                          text=True, cwd=ROOT, env=_env(), timeout=timeout)


def _python_pages():
    pages = {}
    for b in ALL_BLOCKS:
        if b.lang in RUN_LANGUAGES and b.skip_reason is None:
            pages.setdefault(b.path, []).append(b)
    return pages


PYTHON_PAGES = _python_pages()


@pytest.mark.parametrize("path", list(PYTHON_PAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path):
    blocks = PYTHON_PAGES[path]
    start = time.perf_counter()
    proc = run_python_blocks(blocks)
    took = time.perf_counter() - start
    print(proc.stdout)
    assert proc.returncode == 0, (f"a code block of {path.relative_to(ROOT)} failed (exit {proc.returncode}); "
                                  f"blocks run: {proc.stdout.count('[docs-test]')} of {len(blocks)}\n"
                                  f"{proc.stderr[-6000:]}")
    print(f"{path.relative_to(ROOT)}: {len(blocks)} python blocks in {took:.1f} s")


def test_a_broken_block_fails_and_names_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro.\n\n```python\nx = 1\n```\n\nThen:\n\n```python\ny = x + 1\nassert y == 3, 'wrong'\n```\n")
    blocks = [Block(b.path, b.line, b.lang, b.code, b.marker) for b in read_blocks(page)]
    for b in blocks:  # run_python_blocks names files relative to the repository
        b.path = ROOT / "page.md"
    proc = run_python_blocks(blocks, timeout=60)
    assert proc.returncode != 0
    assert 'File "page.md", line 11' in proc.stderr and "AssertionError: wrong" in proc.stderr
    assert proc.stdout.count("[docs-test]") == 1  # the first block ran, the second failed


# ------------------------------------------------------------------------------- shell blocks
def shell_commands(code: str) -> List[List[str]]:
    """The commands of a shell block as argument lists: continuations joined, comments dropped,
    ``a && b`` split, leading ``VAR=value`` assignments removed."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: List[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||"):
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _is_runnable(block: Block) -> bool:
    if block.marker == "run":
        return True
    cmds = shell_commands(block.code)
    return bool(cmds) and all(any(p.match(" ".join(c)) for p in RUNNABLE_COMMANDS) for c in cmds)


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGUAGES and b.skip_reason is None]
RUN_SHELL = [b for b in SHELL_BLOCKS if _is_runnable(b)]
CHECK_SHELL = [b for b in SHELL_BLOCKS if not _is_runnable(b)]


@pytest.mark.parametrize("block", RUN_SHELL, ids=lambda b: b.where)
def test_shell_blocks_run(block):
    for cmd in shell_commands(block.code):
        if cmd[0] == "python":
            cmd = [sys.executable, *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
        assert proc.returncode == 0, f"{block.where}: {shlex.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}"


def _parser_for(module: str):
    if module == "comparisons":
        from comparisons.cli import build_parser
    else:
        from linf_plugin.training.__main__ import build_parser
    return build_parser()


def _deprecated_options(parser, args: List[str]) -> List[str]:
    """Options in ``args`` whose help says they are deprecated (sub-commands' parsers included)."""
    import argparse

    parsers, found = [parser], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            if "deprecated" in (action.help or "").lower():
                found += [a for a in args if a.split("=")[0] in action.option_strings]
    return sorted(set(found))


def check_command(cmd: List[str]) -> Optional[str]:
    """Why ``cmd`` (one command of a docs page) is wrong, or None; commands it knows nothing about pass."""
    if cmd[0] == "torchrun" and "-m" in cmd:
        cmd = ["python", *cmd[cmd.index("-m"):]]
    if cmd[0].endswith("python") and len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] in ("comparisons",
                                                                                      "linf_plugin.training"):
        args = cmd[3:]
        parser = _parser_for(cmd[2])
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                return f"does not parse: {err.getvalue().strip().splitlines()[-1]}"
        old = _deprecated_options(parser, args)
        return f"uses deprecated options {old}" if old else None
    if cmd[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in (w for w in cmd[1:] if not w.startswith("-") and "=" not in w and not w.startswith("[")):
            if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.MULTILINE):
                return f"the Makefile has no target {target!r}"
        return None
    script = next((w for w in cmd[:2] if w.endswith((".py", ".sh")) and "/" in w), None)
    if script is not None and cmd[0] in ("python", "bash") and script.split("/")[0] in ("benchmarks", "scripts"):
        path = ROOT / script
        if not path.is_file():
            return f"{script} does not exist"
        text = path.read_text(encoding="utf-8")
        missing = [w.split("=")[0] for w in cmd if w.startswith("--") and f'"{w.split("=")[0]}"' not in text]
        return f"{script} has no option {missing}" if missing else None
    if cmd[0].endswith("python") and "pytest" in cmd:
        missing = [w for w in cmd if w.startswith("tests/") and not (ROOT / w.split("::")[0]).exists()]
        return f"no such test path {missing}" if missing else None
    return None


@pytest.mark.parametrize("block", CHECK_SHELL, ids=lambda b: b.where)
def test_shell_commands_exist(block):
    problems = [f"{shlex.join(c)}: {why}" for c in shell_commands(block.code) if (why := check_command(c))]
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


def test_the_command_checks_catch_mistakes():
    assert check_command(["python", "-m", "comparisons", "run", "--no-such-option"])
    assert check_command(["python", "-m", "linf_plugin.training", "--preset", "x", "--bogus", "1"])
    assert check_command(["make", "no-such-target"])
    assert check_command(["python", "benchmarks/no_such.py"])
    assert check_command(["python", "benchmarks/lp_dist.py", "--no-such-option"])
    assert check_command(["python", "-m", "comparisons", "run", "--models", "linf"]) is None
    assert check_command(["make", "test"]) is None


# ------------------------------------------------------------------------------- skips and links
@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.where)
def test_skipped_block(block):
    pytest.skip(f"{block.where} ({block.lang}): {block.skip_reason}")


def test_skip_markers_are_few():
    listing = "\n".join(f"  {b.where}: {b.skip_reason}" for b in SKIPPED)
    print(f"{len(SKIPPED)} of {len(ALL_BLOCKS)} code blocks skipped" + (f":\n{listing}" if SKIPPED else ""))
    assert len(SKIPPED) <= MAX_SKIPPED_BLOCKS, f"too many skipped code blocks:\n{listing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for m in LINK.finditer(text):
        target = m.group("target")
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)
