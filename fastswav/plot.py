"""Pictures of a training run from its ``log.jsonl``.

``python -m fastswav.plot RUN_DIR`` writes, into RUN_DIR (or ``--output``):

- ``loss.png``: the loss of each logged step, and each epoch's mean at the epoch's end;
- ``lr.png``: the learning rate of each logged step;
- ``img_per_s.png``: training throughput (images per second, all processes together);
- ``knn.png``: kNN top-1 against the epoch it was measured after (0: at initialisation).

``python -m fastswav.plot RUN_DIR --neighbors`` writes ``neighbors.png`` instead: a few test
images, each followed by its nearest training images by the trained trunk (the run's latest
checkpoint) and then by the untrained one (the model rebuilt from the run's config with the
run's seed), framed green where the neighbour has the query's label and red where not (no
frames for unlabelled data). Training writes the same picture at the end of a run with
``knn_at_end``. It needs PIL alone, not matplotlib.

Step figures are drawn against wall-clock minutes since the run's first record
(``--x time``) or against the global iteration (``--x iteration``). A figure whose records
are absent from the log (no kNN evaluation, say) is not written. The log is the JSON-lines
file :mod:`fastswav.train` writes: ``{"event": "step", "epoch", "iteration", "loss", "lr",
"img_per_s", "time"}``, ``{"event": "epoch", "epoch", "loss", "time"}``,
``{"event": "knn", "epoch", "knn_top1", "time"}``; lines that are not JSON (a run killed
mid-write) are skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .cli import UsageParser, fail

log = logging.getLogger("fastswav")

LOG_NAME = "log.jsonl"


class PlotError(Exception):
    """A missing dependency or log; the message is one line for the command line."""


def read_log(path) -> List[dict]:
    """The records of a JSON-lines log, skipping blank and unparsable lines."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON, skipped", path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: Sequence[dict], event: str, key: str, x_key: str, t0: float):
    xs, ys = [], []
    for record in records:
        if record.get("event") != event or record.get(key) is None:
            continue
        if x_key == "time":
            if record.get("time") is None:
                continue
            x = (record["time"] - t0) / 60.0
        else:
            if record.get(x_key) is None:
                continue
            x = record[x_key]
        xs.append(x)
        ys.append(record[key])
    return xs, ys


def plot_run(run_dir, output_dir=None, x_axis: str = "time") -> Dict[str, Path]:
    """Write the run's PNGs; returns {figure name: path} of those written.

    Raises :class:`PlotError` when matplotlib is missing, the log is missing, or it holds
    nothing to plot.
    """
    if x_axis not in ("time", "iteration"):
        raise PlotError(f"x axis must be 'time' or 'iteration', got {x_axis!r}")
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_NAME if run_dir.is_dir() else run_dir
    if not log_path.is_file():
        raise PlotError(f"no {LOG_NAME} in {run_dir} (is it a fastswav run folder?)")
    records = read_log(log_path)
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if not records:
        raise PlotError(f"{log_path} holds no records")
    plt = _pyplot()
    output_dir = Path(output_dir) if output_dir else log_path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = min(times) if times else 0.0
    x_label = "minutes since start" if x_axis == "time" else "iteration"
    written: Dict[str, Path] = {}

    def save(fig, name: str) -> None:
        path = output_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name] = path

    step_x = "time" if x_axis == "time" else "iteration"
    for name, key, y_label in (("loss", "loss", "SwAV loss"), ("lr", "lr", "learning rate"),
                               ("img_per_s", "img_per_s", "images / s")):
        xs, ys = _series(records, "step", key, step_x, t0)
        epoch_xs, epoch_ys = [], []
        if name == "loss" and x_axis == "time":  # epoch records carry no iteration
            epoch_xs, epoch_ys = _series(records, "epoch", "loss", "time", t0)
        if not xs and not epoch_xs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        if xs:
            ax.plot(xs, ys, linewidth=1, label="logged step")
        if epoch_xs:
            ax.plot(epoch_xs, epoch_ys, "o-", markersize=4, label="epoch mean")
            ax.legend()
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.set_title(f"{y_label}: {run_dir.name}")
        save(fig, name)

    knn_epochs, knn_top1 = _series(records, "knn", "knn_top1", "epoch", t0)
    if knn_epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(knn_epochs, knn_top1, "o-")
        for x, y in zip(knn_epochs, knn_top1):
            ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch (0: at initialisation)")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"kNN top-1: {run_dir.name}")
        save(fig, "knn")
    if not written:
        raise PlotError(f"{log_path} holds no step, epoch or kNN records to plot")
    return written


NEIGHBORS_NAME = "neighbors.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@torch.no_grad()
def _features(trunk, source, indices, transform, device, batch_size: int = 256):
    """(L2-normalised features [n, D], the indices of the readable images among ``indices``)."""
    from .data.sources import UnreadableImageError

    trunk.eval()
    features, kept, batch, batch_indices = [], [], [], []

    def flush():
        if batch:
            out = trunk(torch.stack(batch).to(device)).flatten(1).float()
            features.append(torch.nn.functional.normalize(out, dim=1).cpu())
            kept.extend(batch_indices)
            batch.clear()
            batch_indices.clear()

    for i in indices:
        try:
            image, _ = source.load(int(i))
        except UnreadableImageError:
            continue
        batch.append(transform(image))
        batch_indices.append(int(i))
        if len(batch) == batch_size:
            flush()
    flush()
    return torch.cat(features), kept


def _tile(source, index: int, size: int, colour=None):
    from PIL import Image, ImageOps

    image = source.load(index)[0].convert("RGB")
    image = ImageOps.fit(image, (size, size), Image.BICUBIC)
    if colour is not None:
        image = ImageOps.expand(image.resize((size - 6, size - 6), Image.BICUBIC), 3, colour)
    return image


def neighbor_grid(cfg, trained_trunk, output, n_queries: int = 6, k: int = 5,
                  max_memory: int = 5000, device="cpu", tile: int = 48,
                  title: Optional[str] = None) -> Path:
    """Write the neighbour picture (see the module docstring) of ``trained_trunk`` and the
    untrained trunk of ``cfg`` (a :class:`fastswav.config.Config`) to ``output``.

    Queries: ``n_queries`` test images of distinct classes where the data is labelled
    (the training images themselves, each excluded from its own neighbours, where there is no
    test split); memory: a class-balanced subset of ``max_memory`` training images.
    Returns the path written (through a temporary file and a rename).
    """
    import copy

    from PIL import Image, ImageDraw

    from .data.multicrop import eval_transform
    from .data.sources import open_source
    from .eval.knn import balanced_subset
    from .model import build_model

    memory_source = open_source(cfg.data, "train", cfg.data_kind)
    try:
        query_source = open_source(cfg.data, "test", cfg.data_kind)
        if query_source.path == memory_source.path and query_source.split == memory_source.split:
            query_source = memory_source
    except (ValueError, FileNotFoundError):
        query_source = memory_source
    labelled = len(memory_source.classes) > 0 and int(np.min(memory_source.labels)) >= 0
    memory_indices = balanced_subset(memory_source.labels, max_memory) if labelled \
        else list(range(min(max_memory, len(memory_source))))
    query_indices = balanced_subset(query_source.labels, n_queries) if labelled \
        else list(range(0, len(query_source), max(1, len(query_source) // n_queries)))[:n_queries]

    torch.manual_seed(cfg.seed)  # the untrained trunk: the run's model at its initialisation
    untrained = build_model(cfg).trunk.to(device)
    trained = copy.deepcopy(trained_trunk).to(device)
    transform = eval_transform(max(cfg.size_crops))
    columns = []
    for trunk in (trained, untrained):
        memory, memory_kept = _features(trunk, memory_source, memory_indices, transform, device)
        queries, query_kept = _features(trunk, query_source, query_indices, transform, device)
        similarity = queries @ memory.T
        if query_source is memory_source:  # a query is not its own neighbour
            position = {index: j for j, index in enumerate(memory_kept)}
            for row, index in enumerate(query_kept):
                if index in position:
                    similarity[row, position[index]] = -float("inf")
        top = similarity.topk(min(k, memory.shape[0]), dim=1).indices
        columns.append([[memory_kept[j] for j in row] for row in top.tolist()])
    del trained, untrained

    gap, header = tile // 3, 18 + (16 if title else 0)
    n_rows, n_cols = len(query_kept), len(columns[0][0]) if query_kept else 0
    width = tile + 2 * gap + 2 * n_cols * tile
    canvas = Image.new("RGB", (width, header + n_rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill="black")
    y_text = header - 16
    draw.text((2, y_text), "query", fill="black")
    draw.text((tile + gap + 2, y_text), "nearest: trained trunk", fill="black")
    draw.text((tile + 2 * gap + n_cols * tile + 2, y_text), "nearest: untrained trunk",
              fill="black")
    for row, query in enumerate(query_kept):
        y = header + row * tile
        label = int(query_source.labels[query])
        canvas.paste(_tile(query_source, query, tile), (0, y))
        for block, neighbours in enumerate(columns):
            x0 = tile + gap + block * (gap + n_cols * tile)
            for col, index in enumerate(neighbours[row]):
                colour = None
                if labelled:
                    same = memory_source.classes[int(memory_source.labels[index])] == \
                        query_source.classes[label]
                    colour = (40, 170, 60) if same else (210, 40, 40)
                canvas.paste(_tile(memory_source, index, tile, colour), (x0 + col * tile, y))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=output.name + ".", suffix=".tmp", dir=output.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the picture is not
    try:
        # A 256-colour palette: a third of the size of RGB for photographs, alike to the eye.
        canvas.quantize(256, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def plot_neighbors(run_dir, output=None, n_queries: int = 6, k: int = 5,
                   max_memory: int = 5000, device=None) -> Path:
    """:func:`neighbor_grid` of a run folder's latest checkpoint, to ``output`` (default
    RUN_DIR/neighbors.png). Raises :class:`PlotError` for a folder without a checkpoint."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .config import Config
    from .model import build_model

    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise PlotError(f"no checkpoint in {run_dir} (is it a fastswav run folder?)")
    state = load_checkpoint(checkpoint, map_location="cpu")
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    title = f"{run_dir.name}: {cfg.arch}, {checkpoint.name}"
    try:
        return neighbor_grid(cfg, model.trunk, output or run_dir / NEIGHBORS_NAME, n_queries,
                             k, max_memory, device, title=title)
    except (FileNotFoundError, ValueError) as err:
        raise PlotError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.plot",
        description=(
            "Draw a training run's log.jsonl as PNGs: loss.png (logged steps and epoch means), "
            "lr.png, img_per_s.png and knn.png (kNN top-1 per evaluated epoch). Figures "
            "without data in the log are skipped. Needs matplotlib."),
        epilog="Example: python -m fastswav.plot runs/demo --x iteration",
    )
    parser.add_argument("run_dir", help="run folder holding log.jsonl (or the log file itself)")
    parser.add_argument("--output", default=None,
                        help="folder for the PNGs (default: the run folder)")
    parser.add_argument("--neighbors", action="store_true",
                        help=f"write {NEIGHBORS_NAME} instead: test images beside their nearest "
                             "training images by the trained and by the untrained trunk")
    parser.add_argument("--queries", type=int, default=6,
                        help="--neighbors: test images shown (default 6)")
    parser.add_argument("--k", type=int, default=5,
                        help="--neighbors: neighbours per test image and trunk (default 5)")
    parser.add_argument("--x", dest="x_axis", default="time", choices=("time", "iteration"),
                        help="x axis of the step figures: wall-clock minutes (default) or "
                             "global iteration")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.neighbors:
        if args.queries < 1 or args.k < 1:
            fail("--queries and --k must be >= 1")
        output = Path(args.output) / NEIGHBORS_NAME if args.output else None
        try:
            path = plot_neighbors(args.run_dir, output, args.queries, args.k)
        except (PlotError, OSError) as err:
            fail(err)
        print(f"wrote {path}")
        return 0
    try:
        written = plot_run(args.run_dir, args.output, args.x_axis)
    except (PlotError, OSError) as err:
        fail(err)
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
