"""The documentation speaks of the project, and what it names exists.

README.md, docs/*.md, benchmarks/*.md and the Makefile: no words about how the project was
made (sessions, lent or borrowed machines, calls and minutes on them, workstations, local
package indexes, paths outside the repository); every ``python -m MODULE`` names
a module that imports; every relative link resolves (headings included); the README's file
paths, make targets and preset table match the repository; the resume rules in
docs/training.md are the code's.
"""
import importlib.util
import re
from pathlib import Path

import pytest

from fastswav.config import PRESETS, RESUME_MAY_CHANGE, preset

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BENCHMARK_NOTES = sorted((REPO / "benchmarks").glob("*.md"))

# Pages the README's documentation index must link.
INDEXED_DOCS = {"docs/fault_tolerance.md", "docs/memory.md", "docs/device_check.md",
                "docs/own_data.md"}

FORBIDDEN = [
    (re.compile(r"session", re.I), "a session"),
    (re.compile(r"\blent\b", re.I), "a lent machine"),
    (re.compile(r"issue\s*#", re.I), "an issue number"),
    (re.compile(r"\bissues?\s+\d", re.I), "an issue number"),
    (re.compile(r"\.\./shared"), "a path outside the repository"),
    (re.compile(r"/work/|/etc/xdg|/opt/"), "a path outside the repository"),
    (re.compile(r"borrow", re.I), "a borrowed machine"),
    (re.compile(r"workstation", re.I), "a workstation"),
    (re.compile(r"package index|local wheels?\b|constraint file", re.I), "how packages come here"),
    (re.compile(r"\bthe GPU machines\b|\bto the GPU machine\b|versions the GPU runs", re.I),
     "the project's GPU machines"),
    (re.compile(r"\bwarm (machine|for)\b|stays? warm", re.I), "a machine kept warm between calls"),
    (re.compile(r"\bis one call\b|\bcalls? (to|on) the (machine|GPU)\b|warm for", re.I),
     "calls to a machine"),
    (re.compile(r"\bbudget\b(?! *-s)|minutes? of (GPU|device)|device time|GPU minutes", re.I),
     "a budget of machine time"),
]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _pages():
    return [README, *DOCS, *BENCHMARK_NOTES]


def _page_params():
    return [pytest.param(page, id=_rel(page)) for page in _pages()]


def _scanned_params():
    return [pytest.param(page, id=_rel(page)) for page in [*_pages(), REPO / "Makefile"]]


@pytest.mark.parametrize("page", _scanned_params())
def test_pages_speak_of_the_project_only(page):
    found = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for pattern, what in FORBIDDEN:
            if pattern.search(line):
                found.append(f"{_rel(page)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_python_dash_m_module_imports():
    missing = []
    for page in [README, *DOCS]:
        text = page.read_text()
        for module in sorted(set(re.findall(r"(?:python3?|torchrun\b[^\n`]*?)\s-m\s+([A-Za-z_][\w.]*)", text))):
            try:
                spec = importlib.util.find_spec(module)
            except ModuleNotFoundError:
                spec = None
            if spec is None:
                missing.append(f"{_rel(page)}: python -m {module}")
    assert not missing, "modules that do not import:\n" + "\n".join(missing)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path):
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.M)}


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *DOCS, *BENCHMARK_NOTES], ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
        if not path.exists():
            broken.append(f"{link} (no {rel})")
            continue
        if anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {rel})")
    assert not broken, f"{_rel(page)}: broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_doc_page():
    links = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    assert {REPO / p for p in INDEXED_DOCS} | set(DOCS) <= links


def test_readme_file_paths_exist():
    text = README.read_text()
    tops = "fastswav|kernels|csrc|benchmarks|tests|docs|examples|\\.ci"
    missing = []
    for match in re.finditer(rf"(?<![\w/.~-])((?:{tops})/[\w./-]*\w)(?![\w/]*<)", text):
        path = match.group(1)
        if not (REPO / path).exists():
            missing.append(path)
    assert not missing, "README names paths that do not exist: " + ", ".join(sorted(set(missing)))


def test_make_targets_named_in_the_docs_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    named = set()
    for page in [README, *DOCS]:
        named |= set(re.findall(r"`make ([a-z][\w-]*)", page.read_text()))
    assert named and named <= targets, sorted(named - targets)


def test_environment_variables_named_in_the_docs_are_read_somewhere():
    code = "".join(p.read_text() for p in [*REPO.glob("fastswav/**/*.py"), *REPO.glob("kernels/*.py"),
                                           *REPO.glob("tests/*.py"), REPO / "setup.py", REPO / "Makefile"]
                    if p != Path(__file__).resolve())
    unknown = set()
    for page in [README, *DOCS]:
        for name in re.findall(r"\bFASTSWAV_[A-Z_]*[A-Z]", page.read_text()):
            if name not in code:
                unknown.add(f"{_rel(page)}: {name}")
    assert not unknown, sorted(unknown)


def test_readme_opens_with_what_it_is_results_and_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:40])
    assert "arxiv.org/abs/2006.09882" in head
    assert "## Results" in head and "| figure | what | hardware |" in head
    assert "make demo" in head and "make test" in head


def _readme_preset_rows():
    text = README.read_text()
    section = text.split("## Training on ImageNet", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| preset |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([\w-]+)` \|", line)
        if match:
            rows[match.group(1)] = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
    return rows


def test_readme_preset_table_matches_the_code():
    rows = _readme_preset_rows()
    assert list(rows) == list(PRESETS), "README preset table: names or order differ from PRESETS"
    for name, row in rows.items():
        cfg = preset(name)
        assert int(row["batch per GPU"]) == cfg.batch_size, name
        assert row["compile"] == cfg.compile, name
        assert row["epochs"].split()[0] == str(cfg.epochs), name
        gpus = 1 if row["GPUs"] == "CPU" else int(row["GPUs"])
        accumulation = getattr(cfg, "grad_accum", 1) or 1  # steps of gradient accumulation
        assert int(row["global batch"]) == cfg.batch_size * gpus * accumulation, name
        if cfg.lr_reference_batch:
            assert int(row["global batch"]) == cfg.lr_reference_batch, name


def test_training_doc_lists_exactly_the_fields_that_may_change_on_resume():
    text = (REPO / "docs" / "training.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("- **may change**:"))
    listed = re.findall(r"`(\w+)`", line)
    assert listed == sorted(listed)
    assert set(listed) == set(RESUME_MAY_CHANGE)


def test_readme_stays_within_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines"
