"""DynamicSwin and DynamicCNN (ConvNeXt): through timm's factory, load_state_dict, the loader,
harness.measure, the loss and one real training run.

Against the official code itself (same random weights, batch 1/2/3, fixed Gumbel noise, loss
value) the models were checked by hand outside the project (docs/models.md, "Swin and ConvNeXt"); the
tests here check the same properties against the formulas and the official key names.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from mlflow import MlflowClient

import models
from harness.catalog import SPATIAL_MODELS
from harness.config import LossConfig, ModelConfig
from harness.losses import SpatialSparsificationLoss, loss_for
from harness.measure import count_gflops

REPO = Path(__file__).resolve().parents[1]
SWIN, CONVNEXT = "dynamicswin_micro_patch1_window4_32", "dynamicconvnext_micro_patch1_32"
MICROS = (SWIN, CONVNEXT)
OFFICIAL_NAMES = (  # issue 13: the official model zoo's Swin and ConvNeXt models
    "dynamicswin_tiny_patch4_window7_224",
    "dynamicswin_small_patch4_window7_224",
    "dynamicswin_base_patch4_window7_224",
    "dynamicconvnext_tiny",
    "dynamicconvnext_small",
    "dynamicconvnext_base",
)
# 196 positions in the third stage (the 224 px grid), at micro cost
GRID14 = {SWIN: dict(img_size=56, window_size=7), CONVNEXT: dict(img_size=56)}


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- registry
def test_the_official_names_are_registered_with_their_locations() -> None:
    assert set(OFFICIAL_NAMES) <= set(timm.list_models("dynamic*"))
    locations = {name: SPATIAL_MODELS[name]["pruning_loc"] for name in OFFICIAL_NAMES}
    assert locations == {  # HEAD main.py:278-405
        "dynamicswin_tiny_patch4_window7_224": (1, 2, 3),
        "dynamicswin_small_patch4_window7_224": (2, 4, 6),
        "dynamicswin_base_patch4_window7_224": (2, 4, 6),
        "dynamicconvnext_tiny": (1, 2, 3),
        "dynamicconvnext_small": (3, 6, 9),
        "dynamicconvnext_base": (3, 6, 9),
    }


@pytest.mark.parametrize("name", MICROS)
def test_trains_and_infers_at_every_batch_size(name: str) -> None:
    model = build(name, keep_ratio=0.7)
    x = images(model, batch=3)
    out = model.train()(x)
    assert isinstance(out, models.SpatialOutput) and loss_for(model) is SpatialSparsificationLoss
    assert out.logits.shape == (3, 10) and out.keep_fractions.shape == (3, 3)
    assert len(out.decisions) == 3 and all(d.shape == (3, model.num_patches) for d in out.decisions)
    assert all(set(d.unique().tolist()) <= {0.0, 1.0} for d in out.decisions)
    (out.logits.logsumexp(-1).mean() + out.tokens.pow(2).mean() + out.keep_fractions.sum()).backward()
    new = {n: p.grad for n, p in model.named_parameters() if model.is_added_key(n)}
    assert any("score_predictor" in n for n in new) and any(".fast" in n for n in new)
    assert all(g is not None and torch.isfinite(g).all() for g in new.values())
    assert all(new[n].abs().sum() > 0 for n in new if "score_predictor" in n and n.endswith("out_conv.4.weight"))
    model.eval()
    with torch.no_grad():  # the official Swin crashes at batch 2 (its `len(x) == 2` test): ours must not
        one_by_one = torch.cat([model(x[i : i + 1]) for i in range(3)])
        for batch in (1, 2, 3):
            torch.testing.assert_close(model(x[:batch]), one_by_one[:batch], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MICROS)
def test_official_keep_counts_per_location(name: str) -> None:
    """rho 0.7 keeps int(196 x [0.7, 0.7 - 0.2, 0.7 - 0.4]) = 137 / 97 / 58 (not 98: float arithmetic)."""
    model = build(name, keep_ratio=0.7, **GRID14[name]).eval()
    assert model.num_patches == 196 and model.stage_ratios[1] == 0.7 - 0.2
    assert model.num_keep == [137, 97, 58]
    with torch.no_grad():
        _, kept = model.forward_pruned(images(model), return_positions=True)
    assert [k.shape for k in kept] == [(2, 137), (2, 97), (2, 58)]
    assert all(len(set(row.tolist())) == row.numel() and row.max() < 196 for k in kept for row in k)


@pytest.mark.parametrize("name", MICROS)
@pytest.mark.parametrize(
    "plan",
    [dict(pruning_loc=[1], stage_ratios=[0.5]), dict(stage_ratios=[1.0, 1.0, 1.0]), dict(stage_ratios=[0.0, 0.0, 0.0])],
)
def test_pruned_path_equals_masked_path(name: str, plan: dict) -> None:
    """Where no decision flips between locations, the gathered inference path computes the training
    path's blend exactly (exact top-k decisions). Where one flips, the official training path reads
    the other stream's stale value there (reproduced on purpose: see models/swin.py)."""
    model = build(name, deterministic=True, **plan)
    x = images(model, batch=3)
    with torch.no_grad():
        masked = model.train().forward_masked(x)
        pruned, kept = model.eval().forward_pruned(x, return_positions=True)
    torch.testing.assert_close(masked.logits, pruned, rtol=0, atol=1e-5)
    for decision, positions in zip(masked.decisions, kept, strict=True):
        assert torch.equal(decision.nonzero()[:, 1].reshape(3, -1).sort(1).values, positions.sort(1).values)


@pytest.mark.parametrize("name", MICROS)
def test_keep_ratio_one_is_the_dense_backbone(name: str) -> None:
    model = build(name, stage_ratios=[1.0, 1.0, 1.0]).eval()
    dense = build(name, variant="dense").eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MICROS)
def test_no_nan_at_keep_ratio_0_1(name: str) -> None:
    model = build(name, keep_ratio=0.1)
    assert model.stage_ratios == [0.1, 0.0, 0.0] and model.num_keep == [6, 0, 0]  # rho - 0.2 < 0: none kept
    x = images(model, batch=4)
    teacher = build(name, variant="dense").eval()
    with torch.no_grad():
        t = teacher.forward_masked(x)
    out = model.train()(x)
    loss, parts = SpatialSparsificationLoss(LossConfig(ratio=10.0), model.stage_ratios, torch.nn.CrossEntropyLoss())(
        out, torch.arange(4), (t.logits, t.tokens)
    )
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"cls", "ratio", "kl", "token"}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"^variant: must be one of dense, dynamic .*got 'static'$"):
        build(SWIN, variant="static")
    with pytest.raises(
        ValueError, match=r"^pruning_loc: each location must be a third-stage block index in \[0, 3\], got \[1, 4\]$"
    ):
        build(CONVNEXT, pruning_loc=[1, 4])
    with pytest.raises(ValueError, match=r"^input: expected images of shape \(3, 32, 32\), got \(3, 64, 64\)$"):
        build(SWIN).eval()(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"variant: dynamicswin_tiny_patch4_window7_224 .* got 'random'"):
        ModelConfig(name="dynamicswin_tiny_patch4_window7_224", variant="random")
    with pytest.raises(ValueError, match=r"pruning_loc: each location must be a block index in \[0, 8\], got \[9\]"):
        ModelConfig(name="dynamicconvnext_tiny", pruning_loc=[9])  # ConvNeXt-T's third stage has 9 blocks


# ------------------------------------------------------------------- official parameter names
def official_swin_keys(depths, locs, resolution, window) -> set[str]:
    """The official DynamicSwin state dict's keys, written out from dyswin.py's module tree."""
    keys = {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    for i, depth in enumerate(depths):
        res = resolution // 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys |= {
                b + k
                for k in (
                    "norm1.weight",
                    "norm1.bias",
                    "attn.relative_position_bias_table",
                    "attn.relative_position_index",
                    "attn.qkv.weight",
                    "attn.qkv.bias",
                    "attn.proj.weight",
                    "attn.proj.bias",
                    "norm2.weight",
                    "norm2.bias",
                    "mlp.fc1.weight",
                    "mlp.fc1.bias",
                    "mlp.fc2.weight",
                    "mlp.fc2.bias",
                )
            }
            if j % 2 and res > window:  # shifted windows register their attention mask
                keys.add(b + "attn_mask")
            if i == 2 and j >= locs[0]:
                keys |= {b + f"fastmlp.fc1.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")}
        if i < len(depths) - 1:
            keys |= {f"layers.{i}.downsample.{k}" for k in ("reduction.weight", "norm.weight", "norm.bias")}
    keys |= {
        f"layers.2.score_predictor.{s}.{m}.{p}"
        for s in range(len(locs))
        for m in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4")
        for p in ("weight", "bias")
    }
    return keys | {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def official_convnext_keys(depths, locs) -> set[str]:
    """The official DynamicCNN state dict's keys, written out from dyconvnext.py's module tree."""
    keys = {f"downsample_layers.{i}.{m}.{p}" for i in range(4) for m in (0, 1) for p in ("weight", "bias")}
    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"stages.{i}.{j}."
            keys |= {
                b + k
                for k in (
                    "dwconv.weight",
                    "dwconv.bias",
                    "norm.weight",
                    "norm.bias",
                    "pwconv1.weight",
                    "pwconv1.bias",
                    "pwconv2.weight",
                    "pwconv2.bias",
                    "gamma",
                )
            }
            if i == 2 and j >= locs[0]:
                keys |= {
                    b + k
                    for k in (
                        "fast_path.0.weight",
                        "fast_path.0.bias",
                        "fast_path.1.weight",
                        "fast_path.1.bias",
                        "fast_path_gamma",
                    )
                }
    keys |= {
        f"score_predictor.{s}.{m}.{p}"
        for s in range(len(locs))
        for m in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4")
        for p in ("weight", "bias")
    }
    return keys | {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def to_official_swin(state: dict[str, torch.Tensor], official_keys: set[str]) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official layout (downsampling at the end of the previous
    stage, `head` without `.fc`), plus the official buffers (their values are recomputed)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value
    out.update({k: torch.zeros(1) for k in official_keys if k.endswith(("relative_position_index", "attn_mask"))})
    return out


def to_official_convnext(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official layout; the predictors as 1 x 1 convolutions."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if key.startswith("score_predictor.") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


@pytest.mark.parametrize(
    "name,kwargs",
    [
        (SWIN, {}),
        (CONVNEXT, {}),
        ("dynamicswin_tiny_patch4_window7_224", {}),
        ("dynamicconvnext_small", {}),
    ],
)
def test_an_official_state_dict_loads_strictly(name: str, kwargs: dict) -> None:
    spec = SPATIAL_MODELS[name]
    if name in MICROS:
        model = build(name, **kwargs)
    else:
        with torch.device("meta"):  # names and shapes only, no memory
            model = build(name, **kwargs)
    if spec["_family"] == "swin":
        keys = official_swin_keys(
            spec["depths"], spec["pruning_loc"], spec["img_size"] // spec["patch_size"], spec["window_size"]
        )
        official = to_official_swin(model.state_dict(), keys)
    else:
        keys = official_convnext_keys(spec["depths"], spec["pruning_loc"])
        official = to_official_convnext(model.state_dict())
    assert set(official) == keys
    if name not in MICROS:
        return  # the full-size key sets are checked; loading and running them is the micro models' job
    other = build(name, seed=1)
    other.load_state_dict(official, strict=True)
    x = images(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", MICROS)
def test_timm_dense_weights_load_with_only_predictors_and_fast_paths_missing(name: str, tmp_path: Path) -> None:
    spec = SPATIAL_MODELS[name]
    timm_name, arch = (
        ("swin", timm.models.swin_transformer.SwinTransformer)
        if spec["_family"] == "swin"
        else ("convnext", timm.models.convnext.ConvNeXt)
    )
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_") and k != "pruning_loc"}
    if timm_name == "convnext":
        kwargs.pop("img_size")
    torch.manual_seed(3)
    plain = arch(**kwargs).eval()
    path = tmp_path / "timm_dense.pth"
    torch.save({"state_dict": plain.state_dict()}, path)
    model = build(name)
    missing = models.load_weights(model, str(path))
    assert missing and all(model.is_added_key(k) for k in missing)
    assert {k for k in model.state_dict() if model.is_added_key(k)} == set(missing)
    dense = build(name, variant="dense", checkpoint=str(path)).eval()
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), plain(x), rtol=0, atol=1e-5)  # dense = timm's own model


# ----------------------------------------------------------------------------------- loss
def test_spatial_loss_is_the_official_formula() -> None:
    model = build(CONVNEXT, keep_ratio=0.7)
    teacher = build(CONVNEXT, seed=5, variant="dense").eval()
    x, targets = images(model, batch=3), torch.tensor([1, 2, 3])
    out = model.train()(x)
    with torch.no_grad():
        t = teacher.forward_masked(x)
    cfg = LossConfig(cls=1.0, ratio=10.0, kl=0.5, token=0.5)
    loss, parts = SpatialSparsificationLoss(cfg, model.stage_ratios, torch.nn.CrossEntropyLoss())(
        out, targets, (t.logits, t.tokens)
    )
    ratio = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(out.decisions, [0.7, 0.5, 0.3], strict=True)) / 3
    kl = F.kl_div(out.logits.log_softmax(-1), t.logits.log_softmax(-1), reduction="batchmean", log_target=True)
    mse = ((out.tokens - t.tokens) ** 2).mean()  # the whole map: every position, kept or not
    expected = F.cross_entropy(out.logits, targets) + 10 * ratio + 0.5 * kl + 0.5 * mse
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert out.tokens.shape == t.tokens.shape == (3, 4, 4, 64)
    torch.testing.assert_close(parts["token"], mse)


# ---------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize(
    "name,rho,official,dense_official",
    [
        ("dynamicswin_tiny_patch4_window7_224", 0.7, 4.06, 4.51),
        ("dynamicconvnext_tiny", 0.7, 3.59, 4.47),
    ],
)
def test_flops_at_the_zoo_keep_ratio(name: str, rho: float, official: float, dense_official: float) -> None:
    """harness.measure counts matmuls and convolutions; fvcore (the official numbers, backbones.md)
    also counts the LayerNorms, about 0.02-0.04 G more. Counted on the meta device (no compute)."""
    with torch.device("meta"):
        pruned, dense = build(name, keep_ratio=rho), build(name, variant="dense")
    gflops, dense_gflops = count_gflops(pruned), count_gflops(dense)
    assert official - 0.06 < gflops < official and dense_official - 0.04 < dense_gflops < dense_official


def test_the_readme_flops_table_is_what_harness_measure_counts() -> None:
    """Every "ours" number of the Swin/ConvNeXt FLOPs table of docs/models.md (dense, each zoo keep ratio),
    read from the page itself, against `count_gflops` on the meta device."""
    readme = (REPO / "docs" / "models.md").read_text()
    rows = re.findall(
        r"^  \| (Swin|ConvNeXt|DynamicSwin|DynamicCNN)-([TSB]) \| ([0-9./ a-z]+) \| ([0-9./ ]+) \|", readme, re.M
    )
    assert len(rows) == 12, rows
    for model, size, rhos, ours in rows:
        family = "swin" if model.endswith("Swin") else "convnext"
        name = {"swin": f"dynamicswin_{SIZES[size]}_patch4_window7_224", "convnext": f"dynamicconvnext_{SIZES[size]}"}[
            family
        ]
        for rho, value in zip(rhos.split(" / "), ours.split(" / "), strict=True):
            kwargs = {"variant": "dense"} if rho.strip() == "dense" else {"keep_ratio": float(rho)}
            with torch.device("meta"):
                model_ = build(name, **kwargs)
            assert count_gflops(model_) == pytest.approx(float(value), abs=6e-4), (name, rho)


SIZES = {"T": "tiny", "S": "small", "B": "base"}


# ------------------------------------------------------------------------------ one real run
def test_a_spatial_student_trains_through_the_engine(tmp_path: Path) -> None:
    """One epoch of a dynamic micro Swin distilled from a dense micro Swin, through harness.train."""
    dense = build(SWIN, variant="dense", img_size=32)
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": dense.state_dict()}, teacher)
    config = {
        "model": {"name": SWIN, "variant": "dynamic", "keep_ratio": 0.7},
        "data": {
            "name": "synthetic",
            "img_size": 32,
            "in_chans": 3,
            "num_classes": 10,
            "train_size": 32,
            "val_size": 16,
        },
        "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "auto_augment": None, "random_erasing": 0.0},
        "optim": {"warmup_epochs": 0, "backbone_freeze_epochs": 0},
        "losses": {"ratio": 10.0},
        "teacher": {"checkpoint": str(teacher)},
        "train": {"epochs": 1, "batch_size": 16, "ema": None},
        "tracking": {"experiment": "spatial", "uri": f"sqlite:///{tmp_path}/mlflow.db", "visualize_images": 2},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("spatial").experiment_id])
    metrics = run.data.metrics
    assert {"train/loss_token", "train/loss_ratio", "train/loss_kl", "train/keep_stage3"} <= set(metrics)
    assert metrics["val/keep_stage1"] == pytest.approx(44 / 64) and metrics["val/keep_stage2"] == pytest.approx(31 / 64)
    assert 0 < metrics["gflops"] < count_gflops(dense.eval())
    assert "kept_tokens.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]["val/acc1"] >= 0


# ----------------------------------------------------------- recipe: HEAD main.py for Swin / ConvNeXt
def test_the_spatial_recipe_is_heads_swin_convnext_command() -> None:
    """README.md:155 (`--epochs 120 --lr 4e-3 --drop_path 0.2 --update_freq 4 --lr_scale 0.2`, 8 x 128)
    with main.py's defaults (warm-up 20 epochs, min lr 1e-6, EMA 0.9999), loss weights 1 / 10 / 0.5 / 0.5;
    its per-update lr against HEAD's utils.cosine_scheduler written out."""
    from harness.config import RunConfig
    from harness.optim import build_optimizer, build_schedule

    cfg = RunConfig.model_validate({"recipe": "dynamicvit-tpami-spatial", "model": {"name": SWIN}})
    t, o, losses = cfg.train, cfg.optim, cfg.losses
    assert (t.batch_size * 8 * t.accum_steps, t.epochs, t.ema, t.precision) == (4096, 120, 0.9999, "fp32")
    assert (o.lr, o.lr_base_batch, o.warmup_epochs, o.min_lr, o.backbone_lr_scale, o.backbone_freeze_epochs) == (
        4e-3,
        None,
        20,
        1e-6,
        0.2,
        5,
    )
    assert (losses.cls.weight, losses.ratio.weight, losses.kl.weight, losses.token.weight) == (1.0, 10.0, 0.5, 0.5)
    assert cfg.model.drop_path == 0.2
    steps = 1281167 // 4096  # ImageNet-1k updates per epoch at the global batch (main.py:486)
    schedule = build_schedule(o, 4096, 120, steps)
    warmup, total = 20 * steps, 120 * steps
    for step in (0, 5 * steps - 1, 5 * steps, warmup - 1, warmup, total // 2, total - 1):
        expected = (
            4e-3 * step / (warmup - 1)
            if step < warmup
            else 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        )
        assert schedule.base(step) == pytest.approx(expected, rel=1e-12, abs=1e-18)
        assert schedule.backbone(step) == pytest.approx(
            0.0 if step < 5 * steps else 0.2 * expected, rel=1e-12, abs=1e-18
        )
    model = build(SWIN)
    groups = {g["name"]: g for g in build_optimizer(model, o, 4096).param_groups}
    new = {id(p) for g in groups.values() if g["is_predictor"] for p in g["params"]}
    for name, param in model.named_parameters():  # optim_factory.py:82: 'fast' or 'predictor' train at full lr
        assert (id(param) in new) == model.is_added_key(name), name


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """One update from 4 micro-batches of 4 images or from 1 batch of 16: the same gradient (AdamW's
    first moment after one update is 0.1 x the gradient) and the same weights (dense micro ConvNeXt:
    no batch statistics, no randomness)."""

    def run(batch: int, accum: int) -> dict:
        config = {
            "model": {"name": CONVNEXT, "variant": "dense"},
            "data": {
                "name": "synthetic",
                "img_size": 32,
                "in_chans": 3,
                "num_classes": 10,
                "train_size": 16,
                "val_size": 8,
            },
            "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "auto_augment": None, "random_erasing": 0.0},
            "optim": {"warmup_epochs": 0, "backbone_freeze_epochs": 0, "backbone_lr_scale": 1.0},
            "train": {"epochs": 1, "batch_size": batch, "accum_steps": accum, "ema": None},
            "tracking": {"experiment": "accum", "uri": f"sqlite:///{tmp_path}/mlflow.db", "visualize_images": 0},
            "output_dir": str(tmp_path / f"b{batch}"),
        }
        path = tmp_path / f"b{batch}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "harness.train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return torch.load(tmp_path / f"b{batch}" / "checkpoint.pth", map_location="cpu", weights_only=False)

    big, small = run(16, 1), run(4, 4)
    for key, value in big["model"].items():
        torch.testing.assert_close(small["model"][key], value, rtol=0, atol=2e-6)
    for index, state in big["optimizer"]["state"].items():  # a lost micro-batch or a missing 1/4 is far off
        torch.testing.assert_close(
            small["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-8
        )
        assert int(small["optimizer"]["state"][index]["step"]) == 1


# ------------------------------------------------------------------- the spec and its notebook
def test_the_spatial_spec_at_both_scales_matches_the_reference_table(tmp_path: Path) -> None:
    from analysis.reference import load_reference
    from harness.spec import load_and_expand

    root = tmp_path / "imagenet"
    root.mkdir()
    spec = str(REPO / "experiments" / "spatial.yaml")
    paper = load_and_expand(spec, [f"scales.paper.data.root={root}"], scale="paper", check_files=False).runs
    reference = load_reference("spatial")
    assert sorted(r.row for r in paper) == sorted(reference["row"])  # every row has its run, no more
    for run in paper:
        cfg = run.config
        assert cfg.recipe == "dynamicvit-tpami-spatial" and cfg.train.accum_steps == 4, run.name
        if cfg.model.variant == "dynamic":
            assert cfg.model.keep_ratio == float(run.row.split("/")[1])
            assert cfg.model.drop_path == (0.5 if run.row.split("/")[0] in ("swin-b", "convnext-b") else 0.2)
            assert cfg.teacher.run_dir and cfg.train.init_from == cfg.teacher.run_dir
        else:
            assert cfg.train.epochs == 0 and cfg.model.pretrained == SPATIAL_MODELS[cfg.model.name]["_url"]
    tiny = load_and_expand(spec, scale="tiny").runs
    assert sorted(r.row for r in tiny) == [
        "convnext-t/0.7",
        "convnext-t/0.9",
        "convnext-t/1.0",
        "swin-t/0.7",
        "swin-t/0.9",
        "swin-t/1.0",
    ]
    assert {r.config.model.name for r in tiny} == {"dynamicswin_proxy_patch2_window4_64", "dynamicconvnext_proxy_64"}


def test_the_spatial_notebook_is_paired_and_parameterised() -> None:
    import jupytext

    notebook, source = (
        jupytext.read(REPO / "analysis" / "notebooks" / f"spatial_notebook.{ext}") for ext in ("ipynb", "py")
    )
    assert [c.source for c in notebook.cells] == [c.source for c in source.cells], "run jupytext --sync"
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    for key in ("tracking_uri", "experiment", "scale", "output_dir", "table"):
        assert f"{key} = " in parameters.source, key
