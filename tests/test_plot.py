"""Run pictures from a synthetic log.jsonl, and the benchmark CSV pictures."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastswav import plot
from fastswav.plot import PlotError, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def _write_log(run_dir: Path, with_knn: bool = True) -> None:
    records = []
    if with_knn:
        records.append({"event": "knn", "epoch": 0, "knn_top1": 21.5, "time": 1000.0})
    for epoch in range(3):
        for step in range(4):
            iteration = epoch * 4 + step
            records.append({"event": "step", "epoch": epoch, "iteration": iteration,
                            "loss": 8.0 - 0.2 * iteration, "lr": 0.1 * (iteration + 1) / 12,
                            "img_per_s": 500.0 + step, "queue": None,
                            "time": 1000.0 + 30.0 * iteration})
        records.append({"event": "epoch", "epoch": epoch + 1, "loss": 7.0 - epoch,
                        "skipped_images": 0, "seconds": 120.0, "time": 1000.0 + 120.0 * (epoch + 1)})
    if with_knn:
        records.append({"event": "knn", "epoch": 3, "knn_top1": 48.25, "time": 1400.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write('{"event": "step", "trunc')  # a run killed mid-write


@pytest.fixture(autouse=True)
def _needs_matplotlib():
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")


@pytest.mark.parametrize("x_axis", ["time", "iteration"])
def test_run_pictures_are_written(tmp_path, x_axis):
    _write_log(tmp_path / "run")
    written = plot_run(tmp_path / "run", x_axis=x_axis)
    assert set(written) == {"loss", "lr", "img_per_s", "knn"}
    for path in written.values():
        assert path.parent == tmp_path / "run"
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_figures_without_data_are_skipped_and_cli_writes_to_output(tmp_path, capsys):
    _write_log(tmp_path / "run", with_knn=False)
    assert plot.main([str(tmp_path / "run"), "--output", str(tmp_path / "pngs")]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [
        "img_per_s.png", "loss.png", "lr.png"]
    assert capsys.readouterr().out.count("wrote ") == 3


def test_missing_log_and_missing_matplotlib_are_one_line_errors(tmp_path, monkeypatch,
                                                               usage_error):
    assert usage_error(plot.main, [str(tmp_path)]).startswith("error: no log.jsonl in ")
    _write_log(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(PlotError, match="matplotlib is not installed"):
        plot_run(tmp_path / "run")


def test_benchmark_csvs_are_drawn(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_plot", REPO / "benchmarks" / "plot.py")
    bench_plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_plot)
    path = tmp_path / "bench_demo.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench_plot.COLUMNS)
        writer.writeheader()
        for device in ("cpu:test x2", "NVIDIA H200"):
            for variant, ms in (("reference", 4.0), ("fused", 1.0)):
                for shape in ("B=64 K=3000", "B=256 K=3000"):
                    writer.writerow({"date": "2026-11-28", "commit": "abc", "device": device,
                                     "torch": "2.14", "triton": "3.8", "benchmark": "bench_demo",
                                     "variant": variant, "shape": shape, "metric": "ms",
                                     "value": ms, "unit": "ms"})
            writer.writerow({"date": "2026-11-28", "commit": "abc", "device": device, "torch": "2.14",
                             "triton": "3.8", "benchmark": "bench_demo", "variant": "fused",
                             "shape": "B=64 K=3000", "metric": "speedup_vs_reference",
                             "value": 4.0, "unit": "x"})
    assert bench_plot.main([str(path), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "bench_demo.png").read_bytes()[:8] == PNG_SIGNATURE
