"""The two official recipes, pinned to the official code's formulas (written out here, independently
of harness/optim.py), and the paper-scale specs that use them.

Sources (raoyongming/DynamicViT): 2021 = main_dynamic_vit.py / samplers.py / engine.py of the
parent of commit dd32af9; HEAD = main.py, utils.py (cosine_scheduler), optim_factory.py, engine.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401  (registers the family with timm)
from harness.config import RunConfig
from harness.data import RepeatedAugSampler
from harness.engine import precision_plan
from harness.optim import build_optimizer, build_schedule
from harness.spec import load_and_expand

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 30, 1251  # ImageNet-1k at a global batch of 1024: 1281167 // 1024 steps per epoch
GPUS = 8


# ------------------------------------------------------------------ the official formulas, written out
def official_tpami_lrs(step: int) -> tuple[float, float]:
    """HEAD: utils.cosine_scheduler(1e-3, 1e-6, 30, 1251, warmup_epochs=5) (start 0), the
    predictors at x1, the backbone at x0.01 and 0 while epoch < fix_step 5 (engine.py:41-44)."""
    base, final, warmup = 1e-3, 1e-6, 5 * STEPS
    if step < warmup:
        value = float(np.linspace(0.0, base, warmup)[step])
    else:
        i, n = step - warmup, EPOCHS * STEPS - warmup
        value = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))
    epoch = step // STEPS
    return value, (0.0 if epoch < 5 else value * 0.01)


def official_2021_lrs(step: int) -> tuple[float, float]:
    """2021: lr 5e-4 x 96 x 8 / 512 = 7.5e-4, adjust_learning_rate(epoch) with min_lr 1e-5 and
    warming_up_step 5: cosine per epoch; backbone 0 before epoch 5, then min(7.5e-4 * 0.01, cosine)."""
    init, min_lr = 5e-4 * 96 * GPUS / 512.0, 1e-5
    epoch = step // STEPS
    cos_lr = min_lr + (math.cos(epoch / EPOCHS * math.pi) + 1) * 0.5 * (init - min_lr)
    return cos_lr, (0.0 if epoch < 5 else min(init * 0.01, cos_lr))


def paper_config(recipe: str) -> RunConfig:
    """The DeiT-S/0.7 student of table1.yaml at the paper scale under `recipe` (data root faked)."""
    return RunConfig.model_validate(
        {
            "recipe": recipe,
            "model": {"name": "dynamicvit_deit_small_patch16_224", "keep_ratio": 0.7},
        }
    )


@pytest.fixture(scope="module")
def deit_s() -> torch.nn.Module:
    return timm.create_model("dynamicvit_deit_small_patch16_224", keep_ratio=0.7)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


@pytest.mark.parametrize(
    "recipe, official, per_gpu",
    [
        ("dynamicvit-tpami", official_tpami_lrs, 128),
        ("dynamicvit-2021", official_2021_lrs, 96),
    ],
)
def test_every_groups_lr_at_every_step_is_the_official_one(deit_s, recipe, official, per_gpu) -> None:
    cfg = paper_config(recipe)
    assert cfg.train.batch_size == per_gpu
    global_batch = per_gpu * GPUS
    optimizer = build_optimizer(deit_s, cfg.optim, global_batch)
    schedule = build_schedule(cfg.optim, global_batch, cfg.train.epochs, STEPS)
    names = {group["name"] for group in optimizer.param_groups}
    predictor_groups = {n for n in names if n.startswith("predictor")}
    assert predictor_groups and names - predictor_groups == {"base_decay", "base_no_decay"}
    ours = np.zeros((EPOCHS * STEPS, 2))
    expected = np.zeros((EPOCHS * STEPS, 2))
    for step in range(EPOCHS * STEPS):
        schedule.apply(optimizer, step)
        lrs = group_lrs(optimizer)
        assert len({lrs[n] for n in predictor_groups}) == 1
        assert lrs["base_decay"] == lrs["base_no_decay"]
        ours[step] = lrs[next(iter(predictor_groups))], lrs["base_decay"]
        expected[step] = official(step)
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-18)


def test_the_audits_numbers_hold() -> None:
    """recipes.md: HEAD's lr at epoch 20 is 3.46e-4 and its last step ~1e-6 (timm's prefix cosine gave 5.0e-4 /
    6.8e-5)."""
    cfg = paper_config("dynamicvit-tpami")
    schedule = build_schedule(cfg.optim, 1024, EPOCHS, STEPS)
    assert schedule.base(20 * STEPS) == pytest.approx(3.46e-4, abs=5e-7)
    assert schedule.base(EPOCHS * STEPS - 1) == pytest.approx(1e-6, abs=1e-9)
    assert schedule.base(0) == 0.0 and schedule.base(5 * STEPS - 1) == pytest.approx(1e-3)
    old_2021 = build_schedule(paper_config("dynamicvit-2021").optim, 768, EPOCHS, STEPS)
    assert old_2021.base(0) == pytest.approx(7.5e-4) and old_2021.backbone(5 * STEPS) == pytest.approx(7.5e-6)


def expected_groups_2021(name: str, param: torch.nn.Parameter) -> str:
    """main_dynamic_vit.py get_param_groups: 'predictor' in name first (all decayed), then frozen tokens."""
    if "predictor" in name:
        return "decay"
    if "cls_token" in name or "pos_embed" in name:
        return "frozen"
    return "no_decay" if len(param.shape) == 1 or name.endswith(".bias") else "decay"


def expected_groups_tpami(name: str, param: torch.nn.Parameter) -> str:
    """optim_factory.py get_parameter_groups: frozen tokens; 1-D and biases undecayed everywhere."""
    if "cls_token" in name or "pos_embed" in name:
        return "frozen"
    return "no_decay" if len(param.shape) == 1 or name.endswith(".bias") else "decay"


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("dynamicvit-2021", expected_groups_2021),
        ("dynamicvit-tpami", expected_groups_tpami),
    ],
)
def test_weight_decay_and_frozen_parameters_by_name_on_deit_s(recipe, expected) -> None:
    model = timm.create_model("dynamicvit_deit_small_patch16_224", keep_ratio=0.7)
    cfg = paper_config(recipe)
    optimizer = build_optimizer(model, cfg.optim, 1024)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    seen = {"decay": 0, "no_decay": 0, "frozen": 0}
    for name, param in model.named_parameters():
        kind = expected(name, param)
        seen[kind] += 1
        if kind == "frozen":
            assert id(param) not in decay_of and not param.requires_grad, name
        else:
            assert decay_of[id(param)] == (0.05 if kind == "decay" else 0.0), name
    assert seen["frozen"] == 2 and seen["decay"] > 0 and seen["no_decay"] > 0
    predictor_bias = dict(model.named_parameters())["score_predictor.0.out_conv.4.bias"]
    assert decay_of[id(predictor_bias)] == (0.05 if recipe == "dynamicvit-2021" else 0.0)


def test_precision_follows_the_recipe() -> None:
    assert paper_config("dynamicvit-2021").train.precision == "fp16"
    assert paper_config("dynamicvit-tpami").train.precision == "fp32"
    assert precision_plan("fp16", "cuda") == (torch.float16, True)  # autocast + GradScaler (NativeScaler)
    assert precision_plan("fp32", "cuda") == (None, False)
    assert precision_plan("bf16", "cuda") == (torch.bfloat16, False)  # only when asked
    for precision in ("fp16", "bf16", "fp32"):
        assert precision_plan(precision, "cpu") == (None, False)


def test_ema_decay_and_repeated_augmentation_follow_the_recipe() -> None:
    old, head = paper_config("dynamicvit-2021"), paper_config("dynamicvit-tpami")
    assert (old.train.ema, head.train.ema) == (0.99996, 0.9999)
    assert (old.train.repeated_aug, head.train.repeated_aug) == (True, False)
    assert (old.optim.min_lr, head.optim.min_lr) == (1e-5, 1e-6)


def test_an_explicit_value_beats_the_recipe_and_the_dump_round_trips() -> None:
    cfg = RunConfig.model_validate(
        {"recipe": "dynamicvit-2021", "train": {"ema": None, "batch_size": 64}, "losses": {"kl": {"enabled": False}}}
    )
    assert cfg.train.ema is None and cfg.train.batch_size == 64 and cfg.train.precision == "fp16"
    assert cfg.losses.kl.weight == 0.5 and not cfg.losses.kl.active
    again = RunConfig.model_validate(cfg.model_dump())
    assert again == cfg and again.run_key() == cfg.run_key()
    assert RunConfig.model_validate({"recipe": "dynamicvit-tpami"}).run_key() != cfg.run_key()


def official_ra_indices(n: int, replicas: int, rank: int, epoch: int) -> list[int]:
    """samplers.py RASampler written out: randperm seeded by the epoch, x3, pad, stride, cut."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
    tripled = [i for i in perm for _ in range(3)]
    per_replica = math.ceil(n * 3.0 / replicas)
    total = per_replica * replicas
    tripled += tripled[: total - len(tripled)]
    return tripled[rank:total:replicas][: math.floor(n // 256 * 256 / replicas)]


@pytest.mark.parametrize("n, replicas", [(1000, 8), (5003, 8), (777, 3), (600, 1)])
def test_repeated_augmentation_samples_as_the_2021_code(n: int, replicas: int) -> None:
    dataset = list(range(n))
    for epoch in (0, 1, 7):
        per_rank = []
        for rank in range(replicas):
            sampler = RepeatedAugSampler(dataset, seed=0, replicas=replicas, rank=rank)
            sampler.set_epoch(epoch)
            got = list(sampler)
            assert got == official_ra_indices(n, replicas, rank, epoch)
            assert len(sampler) == len(got) == n // 256 * 256 // replicas
            per_rank.append(got)
        counts = np.bincount([i for got in per_rank for i in got], minlength=n)
        assert counts.max() <= 3  # each image at most 3 times per epoch (the padding is cut off)
        if replicas >= 3:  # the three copies of an image go to three different processes
            for got in per_rank:
                assert len(set(got)) == len(got)


def test_the_predictors_start_as_the_official_init() -> None:
    torch.manual_seed(0)
    model = timm.create_model("dynamicvit_deit_small_patch16_224", keep_ratio=0.7)
    for stage, predictor in enumerate(model.score_predictor):
        norm, first = predictor.in_conv[0], predictor.in_conv[1]
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
        linears = [first, predictor.out_conv[0], predictor.out_conv[2], predictor.out_conv[4]]
        for layer in linears:
            assert not layer.bias.any(), f"stage {stage}: biases start at 0"
            assert layer.weight.abs().max() <= 2.0  # trunc_normal_(std=.02) truncates at +-2 (absolute)
            assert abs(layer.weight.mean().item()) < 5 * 0.02 / layer.weight.numel() ** 0.5  # 5 sigma
        for layer in linears[:3]:  # 384x384, 192x384, 96x192: enough samples to pin the std tightly
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.03)
        # PyTorch's default (kaiming uniform, std 1/sqrt(3 fan_in) = 0.059 for fan_in 96) is far off
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_the_paper_specs_use_the_2021_recipe_and_switch_with_one_override(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    root.mkdir()
    data = f"scales.paper.data.root={root}"
    for spec in ("table1", "table3", "losses"):
        expanded = load_and_expand(str(REPO / "experiments" / f"{spec}.yaml"), [data], scale="paper")
        students = [
            r
            for r in expanded.runs
            if r.config.model.variant != "dense" and r.config.model.name == "dynamicvit_deit_small_patch16_224"
        ]
        assert students, spec
        for run in students:
            cfg = run.config
            assert cfg.recipe == "dynamicvit-2021" and cfg.train.batch_size == 96, (spec, run.name)
            assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.sched) == (5e-4, 512, "epoch")
            assert (cfg.train.precision, cfg.train.ema, cfg.train.repeated_aug) == ("fp16", 0.99996, True)
        switched = load_and_expand(
            str(REPO / "experiments" / f"{spec}.yaml"), [data, "scales.paper.recipe=dynamicvit-tpami"], scale="paper"
        )
        for run in switched.runs:
            if run.config.model.variant != "dense" and run.config.model.name == "dynamicvit_deit_small_patch16_224":
                cfg = run.config
                assert (cfg.recipe, cfg.train.batch_size, cfg.optim.lr, cfg.optim.lr_base_batch) == (
                    "dynamicvit-tpami",
                    128,
                    1e-3,
                    None,
                )
                assert (cfg.train.precision, cfg.train.ema, cfg.optim.sched) == ("fp32", 0.9999, "step")
    base = [
        r
        for r in load_and_expand(str(REPO / "experiments" / "table1.yaml"), [data], scale="paper").runs
        if r.stage == "students_base"
    ]
    assert [(r.config.recipe, r.config.model.drop_path, r.config.losses.ratio.weight) for r in base] == [
        ("dynamicvit-tpami", 0.2, 5.0)
    ]


def test_dry_run_shows_the_recipe_of_every_run(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    root.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.launch",
            "experiments/table1.yaml",
            "--scale",
            "paper",
            "--dry-run",
            f"scales.paper.data.root={root}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "rho0.7" in line or "students_base" in line]
    assert any("dynamicvit-2021" in line for line in lines), result.stdout
    assert any("dynamicvit-tpami" in line for line in lines), result.stdout
