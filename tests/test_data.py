"""Reference data path: image sources, multi-crop augmentation, dataset and sharded loader."""
import io
import logging
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fastswav.data.loader import (MultiCropDataset, ShardedShuffleSampler, build_pretrain_loader,
                                  collate_multicrop)
from fastswav.data.multicrop import (IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform,
                                     RandomGaussianBlur, ToNormalizedTensor, eval_transform)
from fastswav.data.sources import (FolderSource, UnreadableImageError, ZipSource, decode_rgb,
                                   open_source)

from conftest import write_files

# torchvision 0.29 deprecates its image decoders (the sources fall back to PIL without them).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Test images: every file of the small layouts, as (relative path, encoded bytes).

def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _random_rgb(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _image_files():
    """train/{cat,dog} and test/{cat,dog}: RGB JPEGs, a PNG with alpha, a grayscale JPEG, a
    CMYK JPEG, a palette PNG and one truncated (corrupt) JPEG at train/cat/c_corrupt.jpg."""
    rng = np.random.default_rng(0)
    files = {}
    for i in range(3):
        files[f"train/cat/c{i}.jpg"] = _encode(_random_rgb(rng, 40 + i, 30), "JPEG")
        files[f"train/dog/d{i}.jpg"] = _encode(_random_rgb(rng, 32, 32), "JPEG")
    rgba = Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA")
    files["train/dog/d_alpha.png"] = _encode(rgba, "PNG")
    gray = Image.fromarray(rng.integers(0, 256, (28, 36), dtype=np.uint8), "L")
    files["train/cat/c_gray.jpg"] = _encode(gray, "JPEG")
    files["train/cat/c_cmyk.jpg"] = _encode(_random_rgb(rng, 24, 24).convert("CMYK"), "JPEG")
    files["train/dog/d_palette.png"] = _encode(_random_rgb(rng, 16, 16).convert("P"), "PNG")
    good = _encode(_random_rgb(rng, 64, 64), "JPEG")
    files["train/cat/c_corrupt.jpg"] = good[: len(good) // 2]
    for i in range(2):
        files[f"test/cat/t{i}.jpg"] = _encode(_random_rgb(rng, 32, 32), "JPEG")
        files[f"test/dog/t{i}.jpg"] = _encode(_random_rgb(rng, 32, 32), "JPEG")
    files["train/notes.txt"] = b"not an image"
    return files


def _write_zip(path, files, deflate=()):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=method)
    return str(path)


TRAIN_IMAGES = 11  # images under train/, the corrupt one included
CORRUPT = "train/cat/c_corrupt.jpg"


@pytest.fixture
def image_folder(tmp_path):
    return write_files(tmp_path / "images", _image_files())


@pytest.fixture
def image_zip(tmp_path):
    # One member deflated: it must go through the ZipFile path, not the raw stored-read path.
    return _write_zip(tmp_path / "images.zip", _image_files(), deflate={"train/dog/d0.jpg"})


def _index_of(source, name):
    return [source.name(i) for i in range(len(source))].index(name)


# ---------------------------------------------------------------------------------------------
# Sources

@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_source_layout_labels_and_splits(kind, image_folder, image_zip):
    path = image_folder if kind == "folder" else image_zip
    train = open_source(path, "train")
    assert isinstance(train, FolderSource if kind == "folder" else ZipSource)
    assert train.split == "train" and train.classes == ["cat", "dog"]
    assert len(train) == TRAIN_IMAGES  # notes.txt is not an image
    for i in range(len(train)):
        assert train.labels[i] == train.classes.index(train.name(i).split("/")[1])
    test = open_source(path, "test")
    assert len(test) == 4 and test.classes == ["cat", "dog"]
    # 'val' falls back to the test split when there is no val/ folder.
    assert open_source(path, "val").split == "test"


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_modes_are_converted_to_rgb(kind, image_folder, image_zip):
    source = open_source(image_folder if kind == "folder" else image_zip)
    files = _image_files()
    for name in ["train/cat/c_gray.jpg", "train/cat/c_cmyk.jpg", "train/dog/d_alpha.png",
                 "train/dog/d_palette.png", "train/cat/c1.jpg", "train/dog/d0.jpg"]:
        image, label = source.load(_index_of(source, name))
        assert image.mode == "RGB"
        expected = Image.open(io.BytesIO(files[name])).convert("RGB")
        assert image.size == expected.size
        # Same pixels as PIL's own conversion (decoders may differ by a rounding step).
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
        assert difference.max() <= 2, name
    gray = np.asarray(source.load(_index_of(source, "train/cat/c_gray.jpg"))[0])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_corrupt_image_raises_unreadable_with_its_name(kind, image_folder, image_zip):
    source = open_source(image_folder if kind == "folder" else image_zip)
    with pytest.raises(UnreadableImageError, match="c_corrupt.jpg"):
        source.load(_index_of(source, CORRUPT))
    with pytest.raises(UnreadableImageError, match="garbage"):
        decode_rgb(b"\xff\xd8 not a jpeg", "garbage")


def test_zip_and_folder_give_the_same_images(image_folder, image_zip):
    folder, archive = open_source(image_folder), open_source(image_zip)
    assert [folder.name(i) for i in range(len(folder))] == \
        [archive.name(i) for i in range(len(archive))]
    for i in range(len(folder)):
        if folder.name(i) == CORRUPT:
            continue
        a, b = folder.load(i), archive.load(i)
        assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_zip_member_with_bad_crc_is_unreadable(tmp_path):
    rng = np.random.default_rng(1)
    data = _encode(_random_rgb(rng, 32, 32), "JPEG")
    path = _write_zip(tmp_path / "crc.zip", {"a/x.jpg": data, "a/y.jpg": data})
    raw = bytearray(open(path, "rb").read())
    position = raw.index(data) + len(data) // 2  # flip a byte inside the first member
    raw[position] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    source = open_source(path)
    with pytest.raises(UnreadableImageError, match="a/x.jpg"):
        source.load(0)
    assert source.load(1)[0].size == (32, 32)


def test_flat_zip_labels_by_name_prefix_or_none(tmp_path):
    rng = np.random.default_rng(2)
    jpeg = _encode(_random_rgb(rng, 20, 20), "JPEG")
    prefixed = _write_zip(tmp_path / "flat.zip", {
        "n015_tench.JPEG": jpeg, "n002_goldfish.JPEG": jpeg, "n002_goldfish_2.JPEG": jpeg})
    source = open_source(prefixed)
    assert source.split is None and source.classes == ["n002", "n015"]
    assert [source.name(i) for i in range(3)] == [
        "n002_goldfish.JPEG", "n002_goldfish_2.JPEG", "n015_tench.JPEG"]
    assert source.labels.tolist() == [0, 0, 1]
    plain = open_source(_write_zip(tmp_path / "plain.zip", {"a.jpg": jpeg, "b_1.jpg": jpeg}))
    assert plain.classes == [] and plain.labels.tolist() == [-1, -1]
    assert plain.load(0)[1] == -1


def test_folder_without_split_folders_is_every_split(tmp_path):
    files = {k[len("train/"):]: v for k, v in _image_files().items() if k.startswith("train/")}
    root = write_files(tmp_path / "plain", files)
    train, test = open_source(root, "train"), open_source(root, "test")
    assert train.split is None and test.split is None
    assert len(train) == len(test) == TRAIN_IMAGES


def test_open_source_errors(tmp_path, image_folder):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(missing, kind="zip")
    with pytest.raises(ValueError, match="unknown data kind 'tar'"):
        open_source(image_folder, kind="tar")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        open_source(image_folder, split="dev")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"no images found in {empty}"):
        open_source(str(empty))
    only_train = tmp_path / "only_train"
    (only_train / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no 'test' split"):
        open_source(str(only_train), "test")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        open_source(str(text))
    with pytest.raises(ValueError, match="not a readable zip"):
        open_source(str(text), kind="zip")
    with pytest.raises(ValueError, match="not a folder"):
        open_source(str(text), kind="folder")
    no_images = _write_zip(tmp_path / "docs.zip", {"readme.txt": b"x"})
    with pytest.raises(ValueError, match="no images found in .*docs.zip"):
        open_source(no_images)


def test_torchvision_cifar10_missing_data_is_a_clear_error(tmp_path):
    root = tmp_path / "cifar"
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found under .*cifar"):
        open_source(str(root), kind="torchvision-cifar10", download=False)
    # 'auto' recognises torchvision's folder, and reports the broken copy inside it.
    (root / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        open_source(str(root))


def test_preload_keeps_pixels_and_unreadable_marker(image_folder):
    lazy = open_source(image_folder)
    loaded = open_source(image_folder, preload=True)
    for i in range(len(lazy)):
        if lazy.name(i) == CORRUPT:
            with pytest.raises(UnreadableImageError, match="c_corrupt"):
                loaded.load(i)
            continue
        assert np.array_equal(np.asarray(lazy.load(i)[0]), np.asarray(loaded.load(i)[0]))


def test_zip_source_pickles_and_works_in_worker_processes(image_zip):
    source = open_source(image_zip)
    source.load(0)  # opens the file in this process first
    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(np.asarray(clone.load(1)[0]), np.asarray(source.load(1)[0]))
    good = [i for i in range(len(source)) if source.name(i) != CORRUPT]
    sizes = torch.utils.data.DataLoader(_SizeOf(source, good), batch_size=None, num_workers=2)
    assert sorted(int(x) for x in sizes) == sorted(
        source.load(i)[0].size[0] for i in good)


class _SizeOf(torch.utils.data.Dataset):
    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source.load(self.indices[i])[0].size[0]


def test_shared_cifar10_zip(shared_data):
    path = os.path.join(shared_data, "cifar10-jpeg.zip")
    train, test = open_source(path, "train"), open_source(path, "test")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.classes == test.classes and len(train.classes) == 10
    assert np.bincount(train.labels).tolist() == [5000] * 10
    for i in (0, 12_345, 49_999):
        image, label = train.load(i)
        assert image.mode == "RGB" and image.size == (32, 32)
        assert train.name(i).split("/")[1] == train.classes[label]
    image, label = test.load(9_999)
    assert test.classes[label] == "truck" and image.size == (32, 32)


# ---------------------------------------------------------------------------------------------
# Multi-crop

def test_multicrop_count_shapes_order_dtype():
    image = _random_rgb(np.random.default_rng(3), 300, 250)
    transform = MultiCropTransform()  # the official 2x224 + 6x96
    crops = transform(image)
    assert len(crops) == 8 and transform.crop_sizes == [224] * 2 + [96] * 6
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 for c in crops)
    small = MultiCropTransform(size_crops=(32, 16), n_crops=(2, 4), min_scale=(0.14, 0.05),
                               max_scale=(1.0, 0.14), blur_prob=0.0)
    assert [c.shape[-1] for c in small(_random_rgb(np.random.default_rng(4), 32, 32))] == \
        [32, 32, 16, 16, 16, 16]


def test_multicrop_is_seeded_by_torch_and_crops_differ():
    image = _random_rgb(np.random.default_rng(5), 64, 64)
    transform = MultiCropTransform(size_crops=(32, 16), n_crops=(2, 2), min_scale=(0.2, 0.1),
                                   max_scale=(1.0, 0.3))
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    again = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_multicrop_normalisation_matches_torchvision():
    image = _random_rgb(np.random.default_rng(6), 40, 30)
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    fused = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(image)
    torch.testing.assert_close(fused, reference(image), rtol=0, atol=1e-5)
    # Whole-image crops, no jitter or blur, a gray image (unchanged by the grayscale step):
    # every pixel comes out as (c/255 - mean)/std.
    plain = MultiCropTransform(size_crops=(16,), n_crops=(1,), min_scale=(1.0,),
                               max_scale=(1.0,), blur_prob=0.0, jitter_strength=0.0)
    out = plain(Image.new("RGB", (16, 16), (100, 100, 100)))[0]
    expected = (100 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 16, 16), rtol=0,
                               atol=1e-5)


def test_blur_probability_and_radius():
    image = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert RandomGaussianBlur(0.0)(image) is image
    blurred = np.asarray(RandomGaussianBlur(1.0)(image), dtype=float)
    assert blurred.std() < np.asarray(image, dtype=float).std()


@pytest.mark.parametrize("kwargs, message", [
    (dict(size_crops=(224, 96), n_crops=(2,)), "same non-zero length"),
    (dict(size_crops=(), n_crops=(), min_scale=(), max_scale=()), "same non-zero length"),
    (dict(size_crops=(224, 0)), "size_crops must be positive"),
    (dict(size_crops=(224, 9.5)), "size_crops must be positive"),
    (dict(n_crops=(2, -1)), "n_crops must be positive"),
    (dict(min_scale=(0.0, 0.05)), "0 < min_scale <= max_scale <= 1"),
    (dict(min_scale=(0.5, 0.2), max_scale=(0.4, 0.3)), "0 < min_scale <= max_scale <= 1"),
    (dict(max_scale=(1.5, 0.14)), "0 < min_scale <= max_scale <= 1"),
    (dict(blur_prob=1.5), "blur_prob"),
    (dict(jitter_strength=-1), "jitter_strength"),
    (dict(mean=(0.5, 0.5)), "mean needs 3 values"),
    (dict(std=(0.2, 0.0, 0.2)), "std values must be > 0"),
])
def test_multicrop_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropTransform(**kwargs)


def test_eval_transform_sizes():
    rng = np.random.default_rng(8)
    tiny = eval_transform(32)
    image = _random_rgb(rng, 32, 32)
    out = tiny(image)
    assert out.shape == (3, 32, 32)
    # 32x32 images pass unchanged: only the normalisation is applied.
    torch.testing.assert_close(out, ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(image),
                               rtol=0, atol=1e-5)
    assert eval_transform(224)(_random_rgb(rng, 500, 375)).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="resize must be an integer >= size"):
        eval_transform(224, resize=200)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        eval_transform(0)


# ---------------------------------------------------------------------------------------------
# Dataset, collate and sharded loader

def _small_transform():
    return MultiCropTransform(size_crops=(16, 8), n_crops=(2, 1), min_scale=(0.3, 0.1),
                              max_scale=(1.0, 0.3), blur_prob=0.0)


def test_dataset_skips_corrupt_image_and_logs_it_once(image_folder, caplog):
    source = open_source(image_folder)
    dataset = MultiCropDataset(source, _small_transform())
    bad = _index_of(source, CORRUPT)
    with caplog.at_level(logging.WARNING, logger="fastswav"):
        crops, skipped = dataset[bad]
        crops_again, skipped_again = dataset[bad]
    assert skipped == skipped_again == 1
    assert [c.shape[-1] for c in crops] == [16, 16, 8]
    warnings = [r for r in caplog.records if "c_corrupt.jpg" in r.getMessage()]
    assert len(warnings) == 1
    assert dataset[(bad + 1) % len(source)][1] == 0


def test_dataset_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    files = _image_files()
    corrupt = files[CORRUPT]
    root = write_files(tmp_path / "bad", {"a/x.jpg": corrupt, "a/y.jpg": corrupt})
    dataset = MultiCropDataset(open_source(root), _small_transform())
    with pytest.raises(RuntimeError, match="no readable image in"):
        dataset[0]
    # Corrupt last image: wraps to the first one.
    good = files["train/cat/c0.jpg"]
    root = write_files(tmp_path / "last_bad", {"a/x.jpg": good, "a/z.jpg": corrupt})
    assert MultiCropDataset(open_source(root), _small_transform())[1][1] == 1


def test_seeded_sample_leaves_the_global_generator_alone(image_folder):
    dataset = MultiCropDataset(open_source(image_folder), _small_transform())
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, _ = dataset[(0, 1234)]
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = dataset[(0, 1234)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_collate_stacks_each_crop_position():
    sample = lambda: [torch.zeros(3, 16, 16), torch.ones(3, 16, 16), torch.ones(3, 8, 8)]
    batch, skipped = collate_multicrop([(sample(), 0), (sample(), 2), (sample(), 1)])
    assert [tuple(t.shape) for t in batch] == [(3, 3, 16, 16), (3, 3, 16, 16), (3, 3, 8, 8)]
    assert skipped == 3 and batch[1].eq(1).all()


@pytest.mark.parametrize("n", [12, 13])
def test_sampler_shards_are_disjoint_cover_and_reshuffle_by_epoch(n):
    def shards(epoch, world_size=2):
        out = []
        for rank in range(world_size):
            sampler = ShardedShuffleSampler(n, rank=rank, world_size=world_size, seed=5)
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    first = shards(0)
    indices = [[i for i, _ in shard] for shard in first]
    assert len(indices[0]) == len(indices[1]) == -(-n // 2)
    if n % 2 == 0:
        assert set(indices[0]).isdisjoint(indices[1])
    assert set(indices[0] + indices[1]) == set(range(n))
    assert len(indices[0] + indices[1]) == n + n % 2  # padding only to even out the shards
    assert first == shards(0)  # deterministic
    assert first != shards(1)  # reshuffled by epoch
    # An image's augmentation seed depends on (seed, epoch, image), not on the sharding.
    seeds_two = dict(pair for shard in first for pair in shard)
    seeds_one = dict(shards(0, world_size=1)[0])
    assert all(seeds_two[i] == seeds_one[i] for i in seeds_two)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        ShardedShuffleSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        ShardedShuffleSampler(10, world_size=0)


def test_batch_larger_than_data_is_a_one_line_error(image_folder):
    dataset = MultiCropDataset(open_source(image_folder), _small_transform())
    with pytest.raises(ValueError) as err:
        build_pretrain_loader(dataset, batch_size=8, world_size=2)
    assert str(err.value) == (f"batch size 8 x 2 processes needs at least 16 images, "
                              f"{image_folder} has {TRAIN_IMAGES}")
    with pytest.raises(ValueError, match="batch size 12 x 1 process needs at least 12"):
        build_pretrain_loader(dataset, batch_size=12)
    assert len(build_pretrain_loader(dataset, batch_size=5, world_size=2)) == 1


def test_loader_batches_are_reproducible_across_worker_counts(image_zip):
    dataset = MultiCropDataset(open_source(image_zip), _small_transform())

    def epoch_batches(num_workers, epoch):
        loader = build_pretrain_loader(dataset, batch_size=4, num_workers=num_workers, seed=3)
        loader.set_epoch(epoch)
        return list(loader)

    serial = epoch_batches(0, epoch=1)
    assert len(serial) == TRAIN_IMAGES // 4
    crops, _ = serial[0]
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)]
    parallel = epoch_batches(2, epoch=1)
    for (a, skipped_a), (b, skipped_b) in zip(serial, parallel):
        assert skipped_a == skipped_b
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = epoch_batches(0, epoch=2)
    assert not torch.equal(serial[0][0][0], other_epoch[0][0][0])
    # Over an epoch without dropped images, the corrupt one is met and counted.
    full = build_pretrain_loader(dataset, batch_size=1, seed=3, drop_last=False)
    assert sum(skipped for _, skipped in full) == 1


# --- workers, crop dtype, and the writer's checks before writing ----------------------------

def test_workers_default_to_the_cores_per_process_and_are_logged(tiny_folder, tmp_path,
                                                                  monkeypatch, caplog):
    from conftest import tiny_config
    from fastswav.distributed import DistInfo
    from fastswav.train import build_data, data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cfg = tiny_config(tiny_folder, tmp_path).replace(workers=-1, augment="pil")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data_workers(cfg) == 2  # 16 cores, 8 processes on this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data_workers(cfg) == 16
    assert data_workers(cfg.replace(workers=3)) == 3 and data_workers(cfg.replace(workers=0)) == 0
    with pytest.raises(ValueError, match="workers"):
        cfg.replace(workers=-2).validate()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO, logger="fastswav"):
        _, loader = build_data(cfg, DistInfo(), torch.device("cpu"))
    assert loader.num_workers == 2
    assert any("data loader: 2 workers per process (the cores per process" in r.getMessage()
               for r in caplog.records)


def test_crops_are_bf16_on_cuda_with_the_values_autocast_would_give():
    """On CUDA the step runs under bf16 autocast, which casts float32 crops to bf16 at the
    first convolution: crops made in bf16 hold exactly those values (checked on the CPU)."""
    from fastswav.data.batched_multicrop import BatchedMultiCrop, training_crop_dtype

    assert training_crop_dtype("cuda") == torch.bfloat16
    assert training_crop_dtype("cpu") == torch.float32
    images = torch.randint(0, 256, (3, 3, 41, 37), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    recipe = dict(size_crops=(24, 12), n_crops=(2, 3), min_scale=(0.14, 0.05),
                  max_scale=(1.0, 0.14))
    wide = BatchedMultiCrop(**recipe)(images, torch.Generator().manual_seed(4))
    half = BatchedMultiCrop(**recipe, out_dtype=torch.bfloat16)(
        images, torch.Generator().manual_seed(4))
    for a, b in zip(wide, half):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)


def test_write_refuses_a_target_without_room_in_one_line(tiny_folder, tmp_path, monkeypatch,
                                                         capsys):
    import shutil
    from collections import namedtuple

    from fastswav.data import write

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 50_000))
    out = tmp_path / "o.beton"
    with pytest.raises(SystemExit) as exit_info:
        write.main([str(tiny_folder), str(out), "--workers", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "GB free" in err[0], err
    assert re.search(r"49 images x [\d.]+ KB, measured on the first 3[12]\)", err[0]), err[0]
    assert not out.exists() and not (tmp_path / "o.beton.partial").exists()


def test_write_finds_a_missing_package_before_reading_the_source(tmp_path, monkeypatch,
                                                                  capsys):
    import importlib.util

    from fastswav.data import write

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    opened = []
    monkeypatch.setattr(write, "open_source", lambda *a, **k: opened.append(a))
    with pytest.raises(SystemExit) as exit_info:
        write.main([str(tmp_path), str(tmp_path / "o.beton")])
    assert exit_info.value.code == 2 and opened == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: missing package(s): tqdm")
