"""Every fenced Python block of README.md and docs/*.md runs as pasted.

Each block runs in a fresh interpreter, in an empty folder, on the CPU. A block that cannot
(it needs a GPU, ImageNet, the network, FFCV, or the reader's own photos or run) says so in
its first line, ``# needs: <what>``, and is then only compiled. A block that needs no more
than the reader's photos, or a run of the demo, also runs: in a folder where the test stands
in for them.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_photos

import fastswav

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


def count_line() -> str:
    """How many blocks there are and which only compile; conftest prints it after the run."""
    compiled_only = [where for where, code in BLOCKS if _needs(code)]
    stood_in = [where for where, _ in STAND_IN_BLOCKS]
    return (f"{len(BLOCKS)} fenced Python blocks in README.md and docs/*.md: "
            f"{len(BLOCKS) - len(compiled_only)} run as pasted, {len(stood_in)} run on "
            f"stand-ins for the reader's photos and run ({', '.join(stood_in) or 'none'}), "
            f"{len(compiled_only) - len(stood_in)} compiled only "
            f"({', '.join(w for w in compiled_only if w not in stood_in) or 'none'})")


def test_blocks_are_found_and_counted():
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
    _run_block(where, code, tmp_path)


def _run_block(where, code, folder):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTSWAV_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{where} failed as pasted:\n{run.stderr[-3000:]}"


STAND_IN = r"(a run|a folder of your photos, my_photos/)"


def _stood_in(code: str) -> bool:
    """The block needs nothing but the reader's photos (my_photos/) or a run of the demo."""
    needs = re.sub(r"\([^)]*\)", "", _first_line(code).split("needs:", 1)[1]).strip()
    return re.fullmatch(rf"{STAND_IN}(\s+and\s+{STAND_IN})?", needs) is not None


STAND_IN_BLOCKS = [(w, c) for w, c in BLOCKS if _needs(c) and _stood_in(c)]


def test_the_photo_and_run_blocks_are_found():
    # The README's own-photos block is among them: a changed needs line must not drop it.
    assert any(where.startswith("README.md:") for where, _ in STAND_IN_BLOCKS), STAND_IN_BLOCKS
    assert len(STAND_IN_BLOCKS) >= 3, STAND_IN_BLOCKS


@pytest.mark.slow
@pytest.mark.parametrize("where,code", [pytest.param(w, c, id=w) for w, c in STAND_IN_BLOCKS])
def test_block_runs_on_stand_ins_for_the_readers_photos_and_run(where, code, tmp_path):
    """my_photos/ holds 72 photos of mixed sizes and modes; runs/demo, where the block needs
    a run of the demo, is one epoch of the demo preset trained on them."""
    photos = write_photos(tmp_path / "my_photos", copies=9)
    if "runs/demo" in code:
        fastswav.train(data=str(photos), preset="demo", output_dir=str(tmp_path / "runs/demo"),
                       epochs=1, knn_at_end=False, tensorboard=False)
    _run_block(where, code, tmp_path)
    if "my_photos.pt" in code:  # an embedding: one row for every photo
        embedded = torch.load(tmp_path / "my_photos.pt")
        assert len(embedded["names"]) == 72 and embedded["embeddings"].shape[0] == 72
