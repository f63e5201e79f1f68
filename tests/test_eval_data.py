"""The evaluation commands read the data the run trained on when --data is left out, as
`make demo` then `python -m fastswav.eval.knn --checkpoint runs/demo` does."""
import shutil

import pytest

from fastswav.train import run
from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    data = root / "images"
    shutil.copytree(tiny_folder, data)
    out = root / "run"
    run(tiny_config(data, out, epochs=1), resume=False)
    return out, data


@pytest.mark.parametrize("module", ["knn", "linear"])
def test_without_data_the_run_s_own_data_is_read(module, tiny_run, capsys):
    import importlib

    out, _ = tiny_run
    main = importlib.import_module(f"fastswav.eval.{module}").main
    extra = ["--steps", "5"] if module == "linear" else ["--k", "3"]
    assert main(["--checkpoint", str(out), "--device", "cpu", *extra]) == 0
    assert "top-1:" in capsys.readouterr().out


def test_without_data_a_moved_data_folder_is_one_line_naming_data(tiny_run, tmp_path,
                                                                  usage_error):
    from fastswav.eval.knn import main

    out, data = tiny_run
    moved = tmp_path / "moved"
    data.rename(moved)
    try:
        line = usage_error(main, ["--checkpoint", str(out), "--device", "cpu"])
    finally:
        moved.rename(data)
    assert str(data) in line and "--data" in line, line
