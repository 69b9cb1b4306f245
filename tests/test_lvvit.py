"""DynamicViT on LV-ViT (models/lvvit.py) through its public entry points: timm's factory, the
checkpoint loader, the training objective, the engine and the specs.

The official layout and formulas are written here from the official names and definitions, never
by importing the official code; equality with the official code itself was checked by hand (README,
"Models": eval logits, training outputs and the loss value).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import models
from harness.config import LossConfig, RunConfig
from harness.losses import DynamicViTLoss, LVViTLoss, loss_for, token_kl_loss
from harness.measure import count_gflops
from harness.spec import load_and_expand
from models.lvvit import LVViTOutput

REPO = Path(__file__).resolve().parents[1]
TINY = "dynamicvit_lvvit_tiny_patch8_64"
LVVIT_S = "dynamicvit_lvvit_small_patch16_224"
LVVIT_M = "dynamicvit_lvvit_medium_patch16_224"
TOKEN_LABELING = "https://github.com/zihangJiang/TokenLabeling/releases/download/1.0"


def tiny(**kwargs) -> models.DynamicLVViT:
    torch.manual_seed(0)
    return timm.create_model(TINY, **kwargs)


def images(model: torch.nn.Module, batch: int = 4, seed: int = 1) -> torch.Tensor:
    height, width = model.patch_embed.img_size
    return torch.randn(batch, model.in_chans, height, width, generator=torch.Generator().manual_seed(seed))


def on_meta(name: str, **kwargs) -> models.DynamicLVViT:
    """LV-ViT-S/M without their weights (PyTorch's meta device): layouts, token counts and FLOPs
    depend on shapes only, and this skips initialising 26M / 57M parameters on a shared CPU."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def decisive(model: models.DynamicLVViT) -> models.DynamicLVViT:
    """At init the predictors' keep scores differ by ~1e-5 between tokens, so float rounding decides
    near-ties; a larger output layer separates the ranking (what is compared stays the same)."""
    with torch.no_grad():
        for predictor in model.score_predictor:
            predictor.out_conv[4].weight.mul_(1000.0)
    return model


# ----------------------------------------------------------------------- the official layout
def official_shapes(
    embed: int,
    depth: int,
    classes: int = 1000,
    stem: int = 64,
    chans: int = 3,
    patch: int = 16,
    tokens: int = 196,
    stages: int = 3,
) -> dict[str, tuple[int, ...]]:
    """Every key of an official DynamicViT-LVViT state dict with its shape (models/dylvvit.py's
    LVViTDiffPruning with p_emb '4_2', mlp_ratio 3, qkv_bias False, return_dense True)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, embed),
        "pos_embed": (1, tokens + 1, embed),
        "patch_embed.conv1.weight": (stem, chans, 7, 7),
        "patch_embed.conv2.weight": (stem, stem, 3, 3),
        "patch_embed.conv3.weight": (stem, stem, 3, 3),
        "patch_embed.proj.weight": (embed, stem, patch // 2, patch // 2),
        "patch_embed.proj.bias": (embed,),
        "norm.weight": (embed,),
        "norm.bias": (embed,),
        "head.weight": (classes, embed),
        "head.bias": (classes,),
        "aux_head.weight": (classes, embed),
        "aux_head.bias": (classes,),
    }
    for i in (1, 2, 3):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"patch_embed.bn{i}.{name}"] = (stem,)
        shapes[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    hidden = 3 * embed
    for b in range(depth):
        p = f"blocks.{b}."
        shapes.update(
            {
                p + "norm1.weight": (embed,),
                p + "norm1.bias": (embed,),
                p + "attn.qkv.weight": (3 * embed, embed),  # no qkv bias
                p + "attn.proj.weight": (embed, embed),
                p + "attn.proj.bias": (embed,),
                p + "norm2.weight": (embed,),
                p + "norm2.bias": (embed,),
                p + "mlp.fc1.weight": (hidden, embed),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (embed, hidden),
                p + "mlp.fc2.bias": (embed,),
            }
        )
    for s in range(stages):
        p = f"score_predictor.{s}."
        shapes.update(
            {
                p + "in_conv.0.weight": (embed,),
                p + "in_conv.0.bias": (embed,),
                p + "in_conv.1.weight": (embed, embed),
                p + "in_conv.1.bias": (embed,),
                p + "out_conv.0.weight": (embed // 2, embed),
                p + "out_conv.0.bias": (embed // 2,),
                p + "out_conv.2.weight": (embed // 4, embed // 2),
                p + "out_conv.2.bias": (embed // 4,),
                p + "out_conv.4.weight": (2, embed // 4),
                p + "out_conv.4.bias": (2,),
            }
        )
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint in that layout with random values (BN variances positive, counters integers)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    return state


TINY_LAYOUT = dict(embed=64, depth=8, classes=10, stem=16, chans=1, patch=8, tokens=64)  # the same layout, CPU-sized


def test_lvvit_s_and_m_have_the_official_names_and_shapes() -> None:
    for name, (embed, depth, heads, locs) in (
        (LVVIT_S, (384, 16, 6, [4, 8, 12])),
        (LVVIT_M, (512, 20, 8, [5, 10, 15])),
    ):
        model = on_meta(name)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(embed, depth)
        assert model.norm.eps == 1e-5 and all(b.norm1.eps == b.norm2.eps == 1e-5 for b in model.blocks)
        assert (model.blocks[0].attn.num_heads, model.pruning_loc) == (heads, locs)
    assert {k: tuple(v.shape) for k, v in tiny().state_dict().items()} == official_shapes(**TINY_LAYOUT)


def test_official_checkpoint_loads_strict_and_tokenlabeling_weights_miss_only_predictors(tmp_path: Path) -> None:
    official = random_state(official_shapes(**TINY_LAYOUT))
    model = tiny()
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.aux_head.weight, official["aux_head.weight"])
    assert torch.equal(model.patch_embed.bn2.running_var, official["patch_embed.bn2.running_var"])
    # TokenLabeling's files are raw state dicts (no "model" key), named .pth.tar
    dense = tmp_path / "lvvit_dense.pth.tar"
    torch.save({k: v for k, v in official.items() if not k.startswith("score_predictor.")}, dense)
    fresh = tiny(keep_ratio=0.7)
    missing = models.load_weights(fresh, str(dense))
    assert missing and all(k.startswith("score_predictor.") for k in missing) and len(missing) == 30
    assert torch.equal(fresh.blocks[7].mlp.fc2.weight, official["blocks.7.mlp.fc2.weight"])
    teacher = timm.create_model(TINY, variant="dense", checkpoint=str(dense))  # strict but for predictors
    assert not any(k.startswith("score_predictor.") for k in teacher.state_dict())
    torch.testing.assert_close(teacher.eval()(images(teacher)), teacher(images(teacher)))
    assert models.MODEL_DEFAULTS[LVVIT_S]["_url"] == f"{TOKEN_LABELING}/lvvit_s-26M-224-83.3.pth.tar"
    assert models.MODEL_DEFAULTS[LVVIT_M]["_url"] == f"{TOKEN_LABELING}/lvvit_m-56M-224-84.0.pth.tar"


def test_skip_scaling_is_constant_and_not_a_parameter() -> None:
    model = tiny(variant="dense").eval()
    block = model.blocks[0]
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        attn, _ = block.attn(block.norm1(x))
        after_attn = x + attn / 2.0  # the official residual: branch / skip_lam, skip_lam 2
        expected = after_attn + block.mlp(block.norm2(after_attn)) / 2.0
        out, _ = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not any("ls1" in n or "ls2" in n or "gamma" in n for n, _ in model.named_parameters())


# --------------------------------------------------------------------------------- paths
def test_the_prediction_is_the_cls_head_plus_half_the_max_of_the_aux_head() -> None:
    model = tiny(variant="dense").eval()
    x = images(model)
    with torch.no_grad():
        out = model.forward_masked(x)
        logits = model(x)
    assert isinstance(out, LVViTOutput) and out.decision is None and out.keep_fractions.shape == (4, 0)
    assert out.tokens.shape == (4, 64, 10)  # aux-head logits of every patch token
    torch.testing.assert_close(logits, out.logits + 0.5 * out.tokens.max(dim=1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.combined, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_dropping_tokens_equals_masking_them(ratio: float) -> None:
    model = decisive(tiny(keep_ratio=ratio)).eval()
    x = images(model, batch=8)
    with torch.no_grad():
        masked = model.forward_masked(x, deterministic=True)
        logits, kept = model.forward_pruned(x, return_positions=True)
    last = torch.zeros_like(masked.decision).scatter_(1, kept[-1], 1.0)
    assert torch.equal(last, masked.decision)
    # pruned prediction = masked CLS logits + 0.5 x max of the masked aux logits over the kept tokens
    aux_kept = masked.tokens.masked_fill(masked.decision[..., None] == 0, float("-inf")).max(dim=1).values
    torch.testing.assert_close(logits, masked.logits + 0.5 * aux_kept, rtol=0, atol=1e-4)


def test_training_mode_returns_the_masked_path_for_every_variant_and_trains() -> None:
    for variant in ("dynamic", "static", "random", "attention", "structural"):
        model = tiny(variant=variant, keep_ratio=0.7).train()
        out = model(images(model))
        assert isinstance(out, LVViTOutput), variant
        tokens = 16 if variant == "structural" else 64
        assert out.tokens.shape == (4, tokens, 10) and out.combined.shape == (4, 10)
        (out.logits.sum() + out.tokens.mean() + out.combined.sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.patch_embed.conv1.weight.grad.abs().sum() > 0  # the stem trains
        assert model.aux_head.weight.grad.abs().sum() > 0
        with torch.no_grad():
            assert model.eval()(images(model)).shape == (4, 10)


def test_kept_token_counts_per_location() -> None:
    """Each block sees CLS + int(196 rho^s) tokens after the s-th pruning location; the aux head the last set."""
    lvvit_s = on_meta(LVVIT_S, keep_ratio=0.7)
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in lvvit_s.blocks]
    hooks.append(lvvit_s.aux_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])))
    try:
        with torch.no_grad():
            _, kept = lvvit_s.forward_pruned(torch.zeros(2, 3, 224, 224, device="meta"), return_positions=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert lvvit_s.num_keep == [137, 96, 67]
    assert seen == [197] * 4 + [138] * 4 + [97] * 4 + [68] * 4 + [67]
    assert [k.shape for k in kept] == [(2, 137), (2, 96), (2, 67)]
    assert on_meta(LVVIT_S, keep_ratio=0.5).num_keep == [98, 49, 24]
    assert on_meta(LVVIT_M, keep_ratio=0.7).num_keep == [137, 96, 67]
    assert tiny(keep_ratio=0.7).num_keep == [44, 31, 21]


def test_no_nan_at_keep_ratio_01() -> None:
    model = tiny(keep_ratio=0.1)  # keeps 6, 0, 0 of 64 tokens
    assert model.num_keep == [6, 0, 0]
    x = images(model)
    teacher = tiny(variant="dense").eval()
    with torch.no_grad():
        t = teacher.forward_masked(x)
    loss = LVViTLoss(LossConfig(), model.stage_ratios, torch.nn.CrossEntropyLoss())
    for deterministic in (False, True):
        model.zero_grad()
        out = model.train().forward_masked(x, deterministic=deterministic)
        total, parts = loss(out, torch.arange(4), (t.logits, t.tokens))
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
        total.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        logits = model.eval()(x)
        tokens, _ = model._forward_gathered(x, track=False)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model.forward_head(tokens))  # no token left: the CLS head alone


# ---------------------------------------------------------------------------------- loss
def test_token_distillation_is_a_kl_over_the_kept_tokens_of_the_batch() -> None:
    """Hand-computed: a = KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2)."""
    a = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    ln3 = math.log(3.0)
    student = torch.zeros(2, 3, 2)  # uniform student token labels
    teacher = torch.tensor(
        [
            [[ln3, 0.0], [100.0, 0.0], [100.0, 0.0]],  # kept: KL a; dropped, dropped
            [[0.0, 0.0], [0.0, ln3], [0.0, 100.0]],
        ]
    )  # kept: 0; kept: a; dropped
    decision = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # the mean over the 3 kept tokens of the batch (not per image: that would be 3a/4)
    assert token_kl_loss(student, teacher, decision).item() == pytest.approx(2 * a / 3, rel=1e-6)
    assert token_kl_loss(student, teacher, torch.zeros(2, 3)).item() == 0.0  # nothing kept: 0

    output = LVViTOutput(
        logits=torch.zeros(2, 2),  # the CLS head
        tokens=student,
        decision=decision,
        keep_fractions=torch.tensor([[0.8, 0.5, 0.4], [0.6, 0.5, 0.3]]),
        combined=torch.tensor([[ln3, 0.0], [ln3, 0.0]]),
    )
    targets = torch.tensor([0, 1])
    stage_ratios = [0.7, 0.7**2, 0.7**3]
    ratio = ((0.1**2 + 0.1**2) / 2 + (0.01**2 + 0.01**2) / 2 + ((0.4 - 0.343) ** 2 + (0.3 - 0.343) ** 2) / 2) / 3
    teacher_cls = torch.tensor([[ln3, 0.0], [0.0, 0.0]])
    loss = LVViTLoss(LossConfig(), stage_ratios, torch.nn.CrossEntropyLoss())
    total, parts = loss(output, targets, (teacher_cls, teacher))
    # with a teacher: CE and KL on the CLS head (ln 2 each image; KL (a + 0) / 2)
    expected = {"cls": math.log(2.0), "ratio": ratio, "kl": a / 2, "token": 2 * a / 3}
    assert {k: pytest.approx(v, rel=1e-5) for k, v in expected.items()} == {k: v.item() for k, v in parts.items()}
    assert total.item() == pytest.approx(math.log(2.0) + 2.0 * ratio + 0.5 * a / 2 + 0.5 * 2 * a / 3, rel=1e-5)
    # without one (no KL, no token term): CE on the combined prediction, -ln(3/4) and -ln(1/4)
    no_teacher = LVViTLoss(LossConfig(kl=0, token=0), stage_ratios, torch.nn.CrossEntropyLoss())
    total, parts = no_teacher(output, targets, None)
    assert set(parts) == {"cls", "ratio"}
    assert parts["cls"].item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-6)


def test_the_engine_picks_the_loss_by_model_family() -> None:
    assert loss_for(tiny()) is LVViTLoss
    assert loss_for(timm.create_model("dynamicvit_micro_patch4_32")) is DynamicViTLoss


def test_a_tiny_lvvit_student_trains_through_the_engine_with_its_dense_teacher(tmp_path: Path) -> None:
    """Engine end to end: dense teacher file -> student init + distillation -> metrics and GFLOPs."""
    from harness.engine import run

    teacher_file = tmp_path / "teacher.pth"
    torch.save({"model": tiny(variant="dense").state_dict()}, teacher_file)
    cfg = RunConfig.model_validate(
        {
            "model": {"name": TINY, "keep_ratio": 0.7, "pretrained": str(teacher_file)},
            "data": {
                "name": "synthetic",
                "img_size": 64,
                "in_chans": 1,
                "num_classes": 10,
                "train_size": 32,
                "val_size": 16,
            },
            "aug": {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
            "optim": {"warmup_epochs": 0, "backbone_freeze_epochs": 0, "backbone_lr_scale": 0.1},
            "teacher": {"checkpoint": str(teacher_file)},
            "train": {"epochs": 1, "batch_size": 16, "ema": None},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "visualize_images": 2},
            "output_dir": str(tmp_path / "run"),
        }
    )
    metrics = run(cfg)
    assert {"train/loss_cls", "train/loss_ratio", "train/loss_kl", "train/loss_token"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("train/loss_kl", "train/loss_token", "val/acc1"))
    assert metrics["gflops"] == pytest.approx(count_gflops(tiny(keep_ratio=0.7)), rel=1e-6)
    assert (tmp_path / "run" / "kept_tokens.png").is_file()


# --------------------------------------------------------------------------------- FLOPs
def test_flops_at_the_zoos_keep_ratios() -> None:
    """Multiply-adds of matmuls and convolutions, predictors and the aux head included; the model
    zoo's 4.6 / 3.7 / 8.5 are these cut to one decimal (docs/models.md)."""
    for name, ratio, ours, zoo in ((LVVIT_S, 0.7, 4.634, 4.6), (LVVIT_S, 0.5, 3.778, 3.7), (LVVIT_M, 0.7, 8.565, 8.5)):
        gflops = count_gflops(on_meta(name, keep_ratio=ratio))  # FLOPs depend on shapes only
        assert gflops == pytest.approx(ours, abs=1e-3), (name, ratio)
        assert math.floor(gflops * 10) / 10 == zoo
    assert count_gflops(on_meta(LVVIT_S, variant="dense")) == pytest.approx(6.552, abs=1e-3)
    assert count_gflops(tiny(keep_ratio=0.7)) == pytest.approx(count_gflops(on_meta(TINY, keep_ratio=0.7)))


def test_the_readme_flops_table_is_what_harness_measure_counts() -> None:
    """Every "ours" number of the LV-ViT FLOPs table of docs/models.md (9 rows), read from the page itself."""
    readme = (REPO / "docs" / "models.md").read_text()
    rows = re.findall(r"^  \| LV-ViT-([SM]) \| ([0-9.]+) \| ([0-9.]+) \|", readme, re.M)
    assert len(rows) == 9, rows
    for size, rho, ours in rows:
        name = {"S": LVVIT_S, "M": LVVIT_M}[size]
        kwargs = {"variant": "dense"} if rho == "1.0" else {"keep_ratio": float(rho)}
        assert count_gflops(on_meta(name, **kwargs)) == pytest.approx(float(ours), abs=6e-4), (size, rho)


# --------------------------------------------------------------------------------- specs
def test_paper_specs_train_lvvit_with_the_2021_script_batch_and_tokenlabeling_teachers(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    root.mkdir()
    data = f"scales.paper.data.root={root}"
    table1 = load_and_expand(str(REPO / "experiments" / "table1.yaml"), [data], scale="paper").runs
    rows = {r.row: r.config for r in table1 if "lvvit" in r.row}
    assert set(rows) == {f"lvvit-{m}/{rho}" for m in "sm" for rho in ("1.0", "0.9", "0.8", "0.7")}
    for row, cfg in rows.items():
        size, rho = row.split("/")
        assert cfg.model.name == (LVVIT_S if size == "lvvit-s" else LVVIT_M)
        assert cfg.recipe == "dynamicvit-2021" and cfg.optim.lr == 5e-4 and cfg.optim.lr_base_batch == 512
        if rho == "1.0":
            assert cfg.model.variant == "dense" and cfg.train.epochs == 0
            assert cfg.model.pretrained == models.MODEL_DEFAULTS[cfg.model.name]["_url"]
        else:
            assert cfg.model.variant == "dynamic" and cfg.model.keep_ratio == float(rho) and cfg.train.epochs == 30
            assert cfg.train.batch_size == (64 if size == "lvvit-s" else 48)  # 2021 README's commands
            assert cfg.teacher.run_dir and cfg.needs_teacher
    losses = load_and_expand(str(REPO / "experiments" / "losses.yaml"), [data], scale="paper").runs
    column = {r.row: r.config for r in losses if r.row.startswith("lvvit-s/") and r.config.model.variant != "dense"}
    assert {row: (c.losses.kl.active, c.losses.token.active, c.train.batch_size) for row, c in column.items()} == {
        "lvvit-s/full": (True, True, 64),
        "lvvit-s/no-token": (True, False, 64),
        "lvvit-s/no-kl": (False, True, 64),
        "lvvit-s/no-both": (False, False, 64),
    }


def test_lvvit_runs_fill_their_table_rows_with_gaps_to_their_own_anchor() -> None:
    """LV-ViT rows are no longer "not available": runs tagged with their row ids fill them (fixture
    runs, invented accuracies), and the loss ablation's LV-ViT-S column is gapped to its own full row."""
    from analysis import tables

    runs = pd.DataFrame(
        {
            "row": ["lvvit-s/1.0", "lvvit-s/0.7", "lvvit-s/full", "lvvit-s/no-both", "full"],
            "scale": "tiny",
            "acc1": [60.0, 58.5, 58.5, 57.0, 61.0],
            "gflops": [0.032, 0.023] + [0.023] * 3,
            "throughput_img_s": 1000.0,
            "run_id": list("abcde"),
        }
    )
    table1 = tables.build_table(runs, "table1").set_index("row")
    assert table1.loc["lvvit-s/0.7", tables.STATUS] == tables.REPRODUCED
    assert table1.loc["lvvit-s/0.7", tables.GAP_REPRO] == pytest.approx(-1.5)
    assert table1.loc["lvvit-s/0.7", tables.GAP_PAPER] == pytest.approx(83.0 - 83.3)
    assert table1.loc["lvvit-m/0.7", tables.STATUS] == tables.MISSING  # LV-ViT-M: paper scale only
    losses = tables.build_table(runs, "losses")
    by_row = losses.set_index("row")
    assert by_row.loc["lvvit-s/no-both", tables.GAP_REPRO] == pytest.approx(-1.5)
    assert by_row.loc["lvvit-s/no-both", tables.GAP_PAPER] == pytest.approx(82.5 - 83.0)
    assert by_row.loc["full", tables.TOP1_REPRO] == 61.0 and (losses[tables.STATUS] != tables.NOT_AVAILABLE).all()
