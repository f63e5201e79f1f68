"""A folder of own photos (mixed sizes; grayscale, CMYK, palette, PNG with alpha) trains with
the default recipe and the README's command line, no flag added."""
import pytest
from conftest import write_photos

from fastswav.config import preset


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "my_photos")


def test_the_default_recipe_is_the_batched_augmentation():
    # The test below must exercise the path a user meets: the demo's default augmentation.
    assert preset("demo").augment == "batched"


def test_own_photos_train_from_the_readme_command_line(photos, tmp_path, capsys):
    from fastswav.train import main

    out = tmp_path / "runs" / "photos"
    # The README's line (--data my_photos/ --arch=torchvision/mobilenet_v3_small), made small.
    status = main(["--data", str(photos), "--arch=torchvision/mobilenet_v3_small:width_mult=0.25",
                   "--output-dir", str(out), "--epochs=1", "--steps_per_epoch=2",
                   "--batch_size=8", "--hidden_dim=16", "--out_dim=8", "--n_prototypes=6",
                   "--n_crops=2,2", "--size_crops=16,8", "--tensorboard=false"])
    assert status == 0, capsys.readouterr().err
    assert (out / "checkpoint_epoch0001.pt").is_file()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("contents", ["nothing", "unreadable files only"])
def test_a_folder_without_one_readable_image_is_one_line(contents, tmp_path, usage_error):
    from fastswav.train import main

    folder = tmp_path / "my_photos"
    folder.mkdir()
    if contents != "nothing":
        for i in range(10):
            (folder / f"{i}.jpg").write_bytes(b"not an image")
    line = usage_error(main, ["--data", str(folder), "--output-dir", str(tmp_path / "run"),
                              "--epochs=1", "--steps_per_epoch=1", "--batch_size=4"])
    assert str(folder) in line, line
