"""Every fenced Python block of README.md and docs/*.md runs as pasted.

Each block runs in a fresh interpreter, in an empty folder, on the CPU. A block that cannot
(it needs a GPU, ImageNet, the network, FFCV, or the reader's own photos or run) says so in
its first line, ``# needs: <what>``, and is then only compiled.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
NEEDS = re.compile(r"#\s*needs:\s*\S")
# What a block may need that the test cannot give it.
ALLOWED_NEEDS = re.compile(r"\b(GPU|ImageNet|network|FFCV|your photos|a run|runs?,? exported|"
                           r"export\w* of an ImageNet run)\b")


def python_blocks():
    """[(page:line, code)] of every fenced Python block, in page order."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page.relative_to(REPO).as_posix()}:{line}", match.group(1)))
    return blocks


BLOCKS = python_blocks()


def _first_line(code: str) -> str:
    return code.strip().splitlines()[0].strip() if code.strip() else ""


def _needs(code: str) -> bool:
    return bool(NEEDS.match(_first_line(code)))


def test_blocks_are_found_and_counted():
    compiled_only = [where for where, code in BLOCKS if _needs(code)]
    print(f"\n{len(BLOCKS)} fenced Python blocks in README.md and docs/*.md: "
          f"{len(BLOCKS) - len(compiled_only)} run, {len(compiled_only)} compiled only "
          f"(# needs: {', '.join(compiled_only) or 'none'})")
    assert len(BLOCKS) >= 10
    # Only what a CPU in an empty folder cannot have excuses a block from running.
    excuses = [(where, _first_line(code)) for where, code in BLOCKS if _needs(code)]
    unexcused = [f"{where}: {line}" for where, line in excuses if not ALLOWED_NEEDS.search(line)]
    assert not unexcused, "\n".join(unexcused)


@pytest.mark.parametrize("where,code", [pytest.param(w, c, id=w) for w, c in BLOCKS])
def test_block_runs_as_pasted(where, code, tmp_path):
    compile(code, where, "exec")  # a syntax error fails every block, runnable or not
    if _needs(code):
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTSWAV_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{where} failed as pasted:\n{run.stderr[-3000:]}"
