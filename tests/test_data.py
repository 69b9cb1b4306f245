"""harness.data through its public entry points: build_data, make_loader, set_epoch."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness.data as data
from harness.config import AugConfig, DataConfig
from harness.data import build_data, make_loader, set_epoch

BACKGROUND = (0.0 - 0.13) / 0.3  # an empty canvas pixel after normalisation


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mnist(cache: Path) -> data.DataBundle:
    return build_data(DataConfig(root=str(cache)))


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * 0.3 + 0.13


# --------------------------------------------------------------------------- cluttered MNIST


def test_cluttered_mnist_shapes_and_ranges(mnist: data.DataBundle) -> None:
    assert (mnist.num_classes, mnist.img_size, mnist.in_chans) == (10, 64, 1)
    assert mnist.mean == (0.13,) and mnist.std == (0.3,)
    assert len(mnist.train) == 4000 and len(mnist.val) == 2000
    for ds in (mnist.train, mnist.val):
        for i in range(0, len(ds), 97):
            x, y = ds[i]
            assert x.shape == (1, 64, 64) and x.dtype == torch.float32
            assert isinstance(y, int) and y == ds.labels[i]
            raw = unnormalise(x)
            assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
            assert x.min().item() == pytest.approx(BACKGROUND)  # mostly empty canvas
        assert set(ds.labels.tolist()) == set(range(10))
    assert {mnist.val[i][1] for i in range(10)} == set(range(10))  # interleaved: first images span classes
    # balanced split with the default sizes
    assert np.bincount(mnist.val.labels).tolist() == [200] * 10
    assert np.bincount(mnist.train.labels).tolist() == [400] * 10


def test_train_val_digits_disjoint(mnist: data.DataBundle) -> None:
    train_ids = set(mnist.train.digit_ids.tolist())
    val_ids = set(mnist.val.digit_ids.tolist())
    assert len(train_ids) == 4000 and len(val_ids) == 1000
    assert not train_ids & val_ids


def test_val_is_deterministic_from_seed(tmp_path: Path) -> None:
    small = dict(train_digits=500, val_digits=100)
    a = build_data(DataConfig(root=str(tmp_path / "a"), **small)).val
    b = build_data(DataConfig(root=str(tmp_path / "b"), **small)).val  # generated afresh
    assert a.cache_path != b.cache_path
    assert torch.equal(torch.stack([a[i][0] for i in range(len(a))]), torch.stack([b[i][0] for i in range(len(b))]))
    assert np.array_equal(a.labels, b.labels)
    c = build_data(DataConfig(root=str(tmp_path / "a"), seed=1, **small)).val
    assert not np.array_equal(a.images, c.images)


def test_train_placements_fresh_per_epoch_but_reproducible(tmp_path: Path) -> None:
    cfg = DataConfig(root=str(tmp_path), train_digits=100, val_digits=10)
    train = build_data(cfg).train
    x0, y0 = train[5]
    assert torch.equal(train[5][0], x0)
    train.set_epoch(1)
    x1, y1 = train[5]
    assert y1 == y0 and not torch.equal(x1, x0)
    other = build_data(cfg).train  # a new process/worker rebuilding the dataset
    other.set_epoch(1)
    assert torch.equal(other[5][0], x1)
    other.set_epoch(0)
    assert torch.equal(other[5][0], x0)


def test_val_cache_written_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(root=str(tmp_path), train_digits=300, val_digits=50, val_placements=3)
    first = build_data(cfg).val
    assert first.cache_path.is_file() and first.cache_path.parent == tmp_path
    assert len(first) == 150
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("val images were regenerated instead of loaded from the cache")

    monkeypatch.setattr(data, "generate_val", boom)
    second = build_data(cfg).val
    assert second.cache_path == first.cache_path
    assert np.array_equal(second.images, first.images) and np.array_equal(second.labels, first.labels)
    # other generation parameters get their own cache file
    monkeypatch.undo()
    third = build_data(cfg.model_copy(update={"clutter": 0})).val
    assert third.cache_path != first.cache_path and not np.array_equal(third.images, first.images)


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path))
    val = build_data(DataConfig(train_digits=100, val_digits=20)).val
    assert val.cache_path.parent == tmp_path / "cluttered_mnist"
    assert val.cache_path.is_file()


def test_cache_and_run_files_follow_the_umask(tmp_path: Path) -> None:
    """Under umask 002 (a group sharing a cluster's folders) the cache and a run folder's files are
    group-readable and -writable like any file open() creates; the cache was mkstemp's 0600 before."""
    from harness import checkpointing, runstate

    previous = os.umask(0o002)
    try:
        val = build_data(DataConfig(root=str(tmp_path / "cache"), train_digits=100, val_digits=20)).val
        runstate.bind(tmp_path / "run", "key", "run-id")
        checkpointing.save_atomic({"step": torch.tensor(1)}, tmp_path / "run" / checkpointing.CHECKPOINT)
    finally:
        os.umask(previous)
    written = [
        val.cache_path,
        tmp_path / "cache" / "mnist5000_uint8.npz",
        tmp_path / "run" / runstate.BINDING,
        tmp_path / "run" / checkpointing.CHECKPOINT,
    ]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: oct(0o664) for path in written
    }
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]  # no temporary file is left


def test_digit_position_varies(tmp_path: Path) -> None:
    val = build_data(DataConfig(root=str(tmp_path), clutter=0, train_digits=500, val_digits=500)).val
    raw = unnormalise(torch.stack([val[i][0][0] for i in range(len(val))]))
    mass = raw.sum(dim=(1, 2))
    grid = torch.arange(64, dtype=torch.float32)
    rows = (raw.sum(2) * grid).sum(1) / mass
    cols = (raw.sum(1) * grid).sum(1) / mass
    # uniform top-left in [0, 36]: std ~10.7 px; a centred digit would give ~1-2 px
    assert rows.std() > 7 and cols.std() > 7
    assert rows.max() - rows.min() > 25 and cols.max() - cols.min() > 25


def test_clutter_lies_outside_the_digit(mnist: data.DataBundle, tmp_path: Path) -> None:
    def ink_outside_digit(val: data.ClutteredMNISTVal) -> np.ndarray:
        outside = val.images.astype(np.int64).copy()
        for img, (top, left) in zip(outside, val.positions, strict=True):
            img[top : top + 28, left : left + 28] = 0
        return outside.sum(axis=(1, 2))

    assert (ink_outside_digit(mnist.val) > 0).mean() > 0.9
    clean = build_data(DataConfig(root=str(tmp_path), clutter=0, train_digits=100, val_digits=50)).val
    assert (ink_outside_digit(clean) == 0).all()


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"img_size": 32}, r"data\.img_size: .*canvas=64.*got 32"),
        ({"in_chans": 3}, r"data\.in_chans: .*got 3"),
        ({"num_classes": 100}, r"data\.num_classes: .*got 100"),
        ({"canvas": 20}, r"data\.canvas: .*got 20"),
        ({"train_digits": 4500, "val_digits": 1000}, r"data\.train_digits: .*<= 5000.*got 4500"),
        ({"seed": -1}, r"data\.seed: .*got -1"),
    ],
)
def test_cluttered_mnist_bad_config(cache: Path, update: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_data(DataConfig(root=str(cache), **update))


def test_img_size_equal_to_canvas_is_accepted(cache: Path) -> None:
    bundle = build_data(DataConfig(root=str(cache), canvas=48, img_size=48, train_digits=100, val_digits=10))
    assert bundle.img_size == 48 and bundle.val[0][0].shape == (1, 48, 48)


# --------------------------------------------------------------------------- ImageNet folders


def write_folder(root: Path, classes: tuple[str, ...] = ("n01", "n02", "n03"), per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30 + i, 40, 3), dtype=np.uint8)
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(pixels).save(folder / f"img{i}.{ext}")
    return root


def test_imagenet_tiny_folder(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imnet")
    bundle = build_data(DataConfig(name="imagenet", root=str(root)), AugConfig())
    assert (bundle.num_classes, bundle.img_size, bundle.in_chans) == (3, 224, 3)
    assert len(bundle.train) == 6 and len(bundle.val) == 6
    for ds in (bundle.train, bundle.val):
        x, y = ds[len(ds) - 1]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 2
    cfg = DataConfig(name="imagenet", root=str(root), img_size=64, num_classes=3)
    small = build_data(cfg, AugConfig(auto_augment=None))
    assert small.train[0][0].shape == (3, 64, 64) and small.val[0][0].shape == (3, 64, 64)


def test_imagenet_errors_name_the_path(tmp_path: Path) -> None:
    def fails(match: str, root: object = None, **kw: object) -> None:
        with pytest.raises(ValueError, match=match):
            build_data(DataConfig(name="imagenet", root=None if root is None else str(root), **kw))

    fails(r"data\.root: .*required for imagenet.*got None")
    fails(r"data\.root: folder does not exist.*nowhere", tmp_path / "nowhere")
    (tmp_path / "a" / "val").mkdir(parents=True)
    fails(r"data\.root: missing train/.*a/train", tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    fails(r"data\.root: missing val/.*b/val", tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "val").mkdir()
    fails(r"data\.root: no class folders.*c/train", tmp_path / "c")

    empty = write_folder(tmp_path / "d")
    (empty / "train" / "n04").mkdir()
    (empty / "val" / "n04").mkdir()
    (empty / "train" / "n04" / "notes.txt").write_text("not an image")
    fails(r"data\.root: class folder has no images.*d/train/n04", empty)

    mismatch = write_folder(tmp_path / "e")
    (mismatch / "train" / "n09").mkdir()
    fails(r"data\.root: val/ classes differ .*missing in val: \['n09'\].*e/val", mismatch)

    good = write_folder(tmp_path / "f")
    fails(r"data\.num_classes: .*has 3 class folders, got 1000", good, num_classes=1000)
    fails(r"data\.in_chans: .*got 1", good, in_chans=1)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    cfg = DataConfig(name="synthetic", img_size=16, in_chans=2, num_classes=5, train_size=40, val_size=8, seed=3)
    bundle = build_data(cfg)
    assert (bundle.num_classes, bundle.img_size, bundle.in_chans) == (5, 16, 2)
    assert bundle.mean == (0.0, 0.0) and bundle.std == (1.0, 1.0)
    assert len(bundle.train) == 40 and len(bundle.val) == 8
    x, y = bundle.train[7]
    assert x.shape == (2, 16, 16) and x.dtype == torch.float32 and 0 <= y < 5
    assert torch.equal(build_data(cfg).train[7][0], x)
    assert not torch.equal(bundle.train[8][0], x) and not torch.equal(bundle.val[7][0], x)
    assert {bundle.train[i][1] for i in range(40)} == set(range(5))
    with pytest.raises(IndexError):
        bundle.train[40]

    default = build_data(DataConfig(name="synthetic"))
    assert default.train[0][0].shape == (3, 32, 32) and default.num_classes == 10
    assert len(default.train) == 256 and len(default.val) == 64


# --------------------------------------------------------------------------- loaders


def first_batches(loader: torch.utils.data.DataLoader, epoch: int, n: int = 2) -> list[torch.Tensor]:
    set_epoch(loader, epoch)
    out = []
    for i, (x, _) in enumerate(loader):
        out.append(x)
        if i + 1 == n:
            break
    return out


def test_loader_order_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    train = build_data(DataConfig(root=str(tmp_path), train_digits=70, val_digits=10)).train
    loader = make_loader(train, batch_size=16, train=True, seed=0, num_workers=0)
    assert len(loader) == 4  # drop_last: 70 // 16
    assert sum(len(x) for x, _ in loader) == 64
    e1 = first_batches(loader, 1)
    e2 = first_batches(loader, 2)
    assert not torch.equal(e1[0], e2[0])
    # a "resumed" run: fresh dataset and loader, epoch 1, worker processes instead of the main one
    resumed = make_loader(
        build_data(DataConfig(root=str(tmp_path), train_digits=70, val_digits=10)).train,
        batch_size=16,
        train=True,
        seed=0,
        num_workers=2,
    )
    assert all(torch.equal(a, b) for a, b in zip(first_batches(resumed, 1), e1, strict=True))
    other_seed = make_loader(train, batch_size=16, train=True, seed=1, num_workers=0)
    assert not torch.equal(first_batches(other_seed, 1)[0], e1[0])


def test_val_loader_keeps_order_and_all_samples() -> None:
    val = build_data(DataConfig(name="synthetic", val_size=10, img_size=8)).val
    loader = make_loader(val, batch_size=4, train=False, seed=0, num_workers=0)
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (10, 3, 8, 8)
    assert torch.equal(xs[3], val[3][0])


def test_distributed_loader(tmp_path: Path) -> None:
    ds = build_data(DataConfig(name="synthetic", train_size=20, img_size=8)).train
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        make_loader(ds, batch_size=4, train=True, seed=0, num_workers=0, distributed=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = make_loader(ds, batch_size=4, train=True, seed=0, num_workers=0, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        set_epoch(loader, 3)
        assert loader.sampler.epoch == 3
        plain = make_loader(ds, batch_size=4, train=True, seed=0, num_workers=0)
        # same (seed, epoch) -> same permutation as the single-process sampler
        assert list(iter(loader.sampler)) == first_indices(plain, 3)
    finally:
        torch.distributed.destroy_process_group()


def first_indices(loader: torch.utils.data.DataLoader, epoch: int) -> list[int]:
    set_epoch(loader, epoch)
    return list(iter(loader.sampler))
