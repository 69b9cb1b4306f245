"""The `imagenet100` scale: the shipped class list, data.classes on generated ImageFolders (a
subset-only folder and a full 1000-class one), the specs' one-GPU dry runs, the errors, and one
short training run whose MLflow run the analysis tables read as ImageNet-100."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from analysis import collect, tables
from harness.class_lists import imagenet1k_wnids, list_file, load_class_list
from harness.config import AugConfig, DataConfig
from harness.data import build_data
from harness.optim import scaled_lr
from harness.spec import load_and_expand

REPO = Path(__file__).resolve().parents[1]
SPECS = ["experiments/table1.yaml", "experiments/table3.yaml", "experiments/losses.yaml"]
SUBSET = load_class_list("imagenet100")
INDEX = {wnid: i for i, wnid in enumerate(imagenet1k_wnids())}


def png(seed: int) -> bytes:
    """A tiny RGB PNG (any image ImageFolder can open will do)."""
    pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, wnids: list[str], per_class: dict[str, int] | None = None) -> Path:
    """root/{train,val}/<wnid>/*.png: `per_class` train images per wnid (default 1), one val image each."""
    blob = png(0)
    for split in ("train", "val"):
        for wnid in wnids:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            count = (per_class or {}).get(wnid, 1) if split == "train" else 1
            for i in range(count):
                (folder / f"{wnid}_{i}.png").write_bytes(blob)
    return root


@pytest.fixture(scope="module")
def subset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the 100 classes: 3 train images in the first 5 classes, 1 elsewhere."""
    return image_folder(tmp_path_factory.mktemp("in100"), SUBSET, {wnid: 3 for wnid in SUBSET[:5]})


def dry_run(spec: str, *overrides: str, scale: str = "imagenet100") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.launch", spec, "--scale", scale, "--dry-run", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------------------ the class list


def test_the_shipped_list_is_cmc_imagenet100_with_imagenet1k_indices() -> None:
    assert len(SUBSET) == len(set(SUBSET)) == 100
    assert set(SUBSET) <= set(INDEX) and len(INDEX) == 1000
    assert SUBSET[:3] == ["n02869837", "n01749939", "n02488291"] and SUBSET[-1] == "n02090622"  # CMC's order
    # well-known ImageNet-1k indices, independent of timm's file: robin, green mamba, tabby cat
    assert (INDEX["n01558993"], INDEX["n01749939"], INDEX["n02123045"]) == (15, 64, 281)
    # the file's reader-facing annotations ("wnid  # index name") agree with the computed indices
    annotated = re.findall(r"^(n\d{8})\s+#\s+(\d+) ", list_file("imagenet100").read_text(), flags=re.M)
    assert [(w, int(i)) for w, i in annotated] == [(w, INDEX[w]) for w in SUBSET]


# ------------------------------------------------------------------------------ data.classes


def test_subset_folder_gives_imagenet1k_labels(subset_root: Path) -> None:
    cfg = DataConfig(name="imagenet", root=str(subset_root), classes="imagenet100", img_size=32)
    bundle = build_data(cfg, AugConfig(auto_augment=None))
    assert bundle.num_classes == 1000  # the pretrained head's classes
    assert (len(bundle.train), len(bundle.val)) == (100 + 5 * 2, 100)
    for ds in (bundle.train, bundle.val):
        assert all(label == INDEX[Path(path).parent.name] for path, label in ds.samples)
        assert set(ds.targets) == {INDEX[w] for w in SUBSET}
    x, y = bundle.val[0]
    assert x.shape == (3, 32, 32) and y == INDEX[Path(bundle.val.samples[0][0]).parent.name]


def test_full_imagenet_folder_reads_only_the_subset_with_imagenet_folder_labels(tmp_path: Path) -> None:
    """In a full 1000-class folder the subset's labels are the ones a plain ImageFolder gives there."""
    root = image_folder(tmp_path / "full", list(imagenet1k_wnids()))
    aug = AugConfig(auto_augment=None)
    full = build_data(DataConfig(name="imagenet", root=str(root), img_size=32), aug)
    subset = build_data(DataConfig(name="imagenet", root=str(root), img_size=32, classes="imagenet100"), aug)
    assert full.num_classes == subset.num_classes == 1000
    assert (len(full.train), len(subset.train), len(subset.val)) == (1000, 100, 100)
    full_label = dict(full.train.samples)
    assert all(full_label[path] == label for path, label in subset.train.samples)
    assert {Path(path).parent.name for path, _ in subset.train.samples} == set(SUBSET)


def test_a_class_list_file_of_the_users_own(tmp_path: Path, subset_root: Path) -> None:
    listed = tmp_path / "five.txt"
    listed.write_text("# five of them\n" + "\n".join(f"{w} some name" for w in SUBSET[:5]) + "\n\n")
    bundle = build_data(
        DataConfig(name="imagenet", root=str(subset_root), classes=str(listed), img_size=32),
        AugConfig(auto_augment=None),
    )
    assert (bundle.num_classes, len(bundle.train), len(bundle.val)) == (1000, 15, 5)
    assert set(bundle.train.targets) == {INDEX[w] for w in SUBSET[:5]}


def test_bad_subsets_are_one_line_errors(tmp_path: Path, subset_root: Path) -> None:
    def fails(match: str, root: Path = subset_root, **kw: object) -> None:
        with pytest.raises(ValueError, match=match):
            build_data(DataConfig(name="imagenet", root=str(root), **{"classes": "imagenet100", **kw}))

    fails(r"data\.num_classes: must be 1000 .*got 100$", num_classes=100)
    fails(r"data\.classes: neither a shipped list .*got 'imagenet1000'$", classes="imagenet1000")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{SUBSET[0]}\nn99999999\n")
    fails(
        rf"data\.classes: line 2 of {re.escape(str(bad))} is not an ImageNet-1k wnid, got 'n99999999'$",
        classes=str(bad),
    )
    bad.write_text(f"{SUBSET[0]}\n{SUBSET[0]}\n")
    fails(r"data\.classes: line 2 of .* repeats a wnid", classes=str(bad))
    partial = image_folder(tmp_path / "partial", SUBSET[:-1])
    fails(
        rf"data\.root: no train/ folder for class {SUBSET[-1]} of data.classes 'imagenet100' "
        rf"\(1 of its 100 classes missing\), got '{re.escape(str(partial / 'train' / SUBSET[-1]))}'$",
        partial,
    )
    (partial / "train" / SUBSET[-1]).mkdir()
    fails(rf"data\.root: no val/ folder for class {SUBSET[-1]}", partial)
    (partial / "val" / SUBSET[-1]).mkdir()
    fails(rf"data\.root: class folder has no images .*got '{re.escape(str(partial / 'train' / SUBSET[-1]))}'$", partial)
    with pytest.raises(ValueError, match=r"classes: a class subset applies to imagenet only"):
        DataConfig(name="synthetic", classes="imagenet100")


# ------------------------------------------------------------------------------ the specs


@pytest.mark.parametrize("spec", SPECS)
def test_dry_run_at_imagenet100_is_one_gpu_with_the_linearly_scaled_lr(spec: str, subset_root: Path) -> None:
    root = f"scales.imagenet100.data.root={subset_root}"
    result = dry_run(spec, root)
    assert result.returncode == 0, result.stderr
    title, _header, *rows = result.stdout.strip().splitlines()
    assert re.match(rf"\w+ \(imagenet100\): {len(rows)} runs", title)
    assert rows and all(row.endswith("1x1 GPU, 10 cpu/task, 1440 min") for row in rows)

    ours = load_and_expand(spec, [root], "imagenet100")
    for plan in ours.runs:
        res, cfg = plan.slurm, plan.config
        world = res.nodes * res.tasks_per_node
        assert (world, res.gpus_per_node, res.array_parallelism) == (1, 1, 1)
        assert (cfg.recipe, cfg.data.classes, cfg.train.batch_size) == ("dynamicvit-2021", "imagenet100", 96)
        if cfg.train.epochs:
            assert cfg.train.epochs == 30
            # the 2021 recipe's rule: 5e-4 x global batch / 512; 8 GPUs x 96 give 7.5e-4, one GPU 9.375e-5
            assert scaled_lr(cfg.optim, cfg.train.batch_size * world) == pytest.approx(9.375e-5)

    # the same runs as the paper scale (model, teacher weights, variants, recipe), on the subset
    paper = load_and_expand(spec, [f"scales.paper.data.root={subset_root}"], "paper")
    by_name = {(p.stage, p.name): p for p in paper.runs}
    skip = {"output_dir": True, "tracking": True, "data": {"classes"}, "train": {"init_from"}, "teacher": {"run_dir"}}
    for plan in ours.runs:
        twin = by_name.pop((plan.stage, plan.name))
        assert plan.config.model_dump(exclude=skip) == twin.config.model_dump(exclude=skip), plan.name
        assert scaled_lr(twin.config.optim, 96 * 8) == pytest.approx(7.5e-4) or not twin.config.train.epochs
    not_here = {
        name
        for name, stage in paper.spec.stages.items()
        if stage.only_scales and "imagenet100" not in stage.only_scales
    }
    assert {stage for stage, _ in by_name} == not_here  # DeiT-B and LV-ViT stay at the paper scale


def test_a_missing_class_folder_stops_the_launch(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "partial", SUBSET[:-2])
    result = dry_run("experiments/table3.yaml", f"scales.imagenet100.data.root={root}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"experiments/table3.yaml: scales.imagenet100.data.root: no train/ folder for class {SUBSET[-2]} "
        f"of data.classes 'imagenet100' (2 of its 100 classes missing), got '{root / 'train' / SUBSET[-2]}'"
    ]
    listed = tmp_path / "typo.txt"
    listed.write_text("n0155899\n")
    result = dry_run(
        "experiments/losses.yaml", f"scales.imagenet100.data.root={root}", f"scales.imagenet100.data.classes={listed}"
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"experiments/losses.yaml: scales.imagenet100.data.classes: line 1 of {listed} is not an "
        "ImageNet-1k wnid, got 'n0155899'"
    ]


# ------------------------------------------------------------------------------ a run, and its table


def test_a_run_on_the_subset_trains_a_1000_class_head_and_tables_say_imagenet100(tmp_path: Path) -> None:
    """harness.train on 300 generated images with the 2021 recipe (its repeated-augmentation sampler
    needs 256): the model keeps 1000 outputs, MLflow gets the run, the table labels it ImageNet-100."""
    root = image_folder(tmp_path / "in100", SUBSET, {wnid: 3 for wnid in SUBSET})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {
        "recipe": "dynamicvit-2021",
        "model": {"name": "dynamicvit_micro_patch4_32", "variant": "dense"},
        "data": {"name": "imagenet", "root": str(root), "classes": "imagenet100", "img_size": 32},
        "aug": {"auto_augment": None},
        "train": {"epochs": 1},
        "output_dir": str(tmp_path / "run"),
        "tracking": {
            "uri": uri,
            "experiment": "table1",
            "visualize_images": 0,
            "tags": {"kind": "train", "scale": "imagenet100", "row": "deit-s/1.0", "spec": "table1"},
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    weights = torch.load(tmp_path / "run" / "model.pth", map_location="cpu", weights_only=True)
    state = weights.get("model", weights)
    assert state["head.weight"].shape[0] == 1000

    runs = collect.collect_runs(uri, "table1", "imagenet100")
    assert len(runs) == 1 and 0.0 <= runs["acc1"].iloc[0] <= 100.0
    table = tables.build_table(runs, "table1")
    assert table.attrs["scale"] == "imagenet100" and table.attrs["notes"][0] == tables.SUBSET_NOTE
    text = tables.to_markdown(table)
    assert "scale imagenet100" in text and "ImageNet-100" in text and "ImageNet-1k" in text
