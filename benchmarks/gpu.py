"""The GPU benchmark: one command for the first machine with a CUDA device.

    python -m benchmarks.gpu [--out DIR]     # on a CUDA machine: within 8 minutes
    python -m benchmarks.gpu --smoke         # the same code paths on the CPU, tiny sizes, < 1 minute

Writes `<out>/gpu.md` and `<out>/gpu.json` (`gpu-smoke.*` with --smoke; default out: reports/benchmarks):
  1. inference images/s of dense DeiT-S, DynamicViT-S/0.7 and /0.5, and EViT and ToMe at DynamicViT/0.7's
     GFLOPs (knobs matched by `analysis.peers_match`, predictors counted), at batch 1, 32 and 128, in fp32
     and under fp16 autocast: the models of one (batch, precision) cell measured side by side, interleaved
     round by round (`benchmarks/inference_speed.py`), warm-up batches untimed, the device synchronised
     around every timed batch; the median over rounds and its interquartile range, the speed-up as the
     ratio of medians and as the median per-round ratio;
  2. the masked DynamicViT-S/0.7 training step (fused masked attention) against the dense DeiT-S step,
     teacher forward timed apart, fp32 and fp16 autocast + GradScaler (`benchmarks/train_step.py`);
  3. 50 training steps of the tiny scale's a/dynamic run (experiments/table3.yaml: the shipped tiny teacher
     as initialisation and distillation teacher) through the engine's `Trainer.train_step` with
     `train.precision=fp16` (autocast + GradScaler): every loss finite, and the loss going down (mean of
     the last 10 steps below the first 10's). The engine trains in fp32 on a CPU, so --smoke checks
     the code path there, not fp16.
Without a CUDA device (and without --smoke) it says so in one line and exits 2. Exit 1 when a check of
part 3 fails on the GPU.

--smoke uses the tiny 64-token ViT (`dynamicvit_tiny_patch8_64`, dense through `variant="dense"`)
instead of DeiT-S, batch 1 and 4, 2 rounds, and 4 training steps of batch 16 on 64 digits:
`tests/test_benchmarks.py` runs it in CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))  # the other benchmarks import each other as top-level modules

EXIT_FAILED, EXIT_NO_DEVICE = 1, 2
TINY_TEACHER = REPO / "checkpoints" / "tiny_teacher_dense.pth"


@dataclass(frozen=True)
class Settings:
    """What one run measures: the GPU's full sizes, or --smoke's tiny ones on the CPU."""

    dense: tuple[str, dict[str, Any]]  # timm name and kwargs of the dense baseline
    dynamic: str  # the registered DynamicViT backbone
    label: str  # its short name in the tables
    dense_label: str
    batches: tuple[int, ...]
    rounds: dict[int, int]  # batch -> interleaved rounds
    warmup: int
    step_batch: int  # training-step comparison
    step_shape: tuple[int, int, int]  # chans, size, classes
    step_rounds: int
    step_warmup: int
    train_steps: int  # part 3
    train_data: dict[str, Any]  # overrides of the run's data section
    train_batch: int | None  # None: the tiny scale's batch (128)


GPU = Settings(
    ("deit_small_patch16_224", {}),
    "dynamicvit_deit_small_patch16_224",
    "DynamicViT-S",
    "DeiT-S (timm, dense)",
    (1, 32, 128),
    {1: 100, 32: 40, 128: 20},
    10,
    64,
    (3, 224, 1000),
    20,
    3,
    50,
    {},
    None,
)
SMOKE = Settings(
    ("dynamicvit_tiny_patch8_64", {"variant": "dense"}),
    "dynamicvit_tiny_patch8_64",
    "DynamicViT-tiny",
    "tiny ViT (dense)",
    (1, 4),
    {1: 2, 4: 2},
    1,
    4,
    (1, 64, 10),
    1,
    1,
    4,
    {"train_digits": 64, "val_digits": 20, "val_placements": 1},
    16,
)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16}


def candidates(settings: Settings) -> dict[str, tuple[str, dict[str, Any], float]]:
    """label -> (timm name, kwargs, GFLOPs): dense, DynamicViT at 0.7 and 0.5, EViT and ToMe matched to
    DynamicViT/0.7's GFLOPs by `analysis.peers_match` (the rules the peers spec is checked against)."""
    from analysis.peers_match import TARGET, gflops, match_keep, match_tome
    from harness.catalog import MODEL_DEFAULTS

    name, spec = settings.dynamic, MODEL_DEFAULTS[settings.dynamic]
    target = gflops(name, **TARGET)
    evit = match_keep(name, "evit", target, variant="evit", fuse_token=True)
    tome = match_tome(name, target, 0.02, spec["depth"], (spec["img_size"] // spec["patch_size"]) ** 2)
    found = {
        settings.dense_label: (*settings.dense,),
        f"{settings.label}/0.7": (name, {"keep_ratio": 0.7}),
        f"{settings.label}/0.5": (name, {"keep_ratio": 0.5}),
        f"EViT/{evit.knob['keep_ratio']} (matched)": (name, {"variant": "evit", **evit.knob}),
        f"ToMe r={tome.knob['tome_r']} (matched)": (name, {"variant": "tome", **tome.knob}),
    }
    return {label: (model, kwargs, gflops(model, **kwargs)) for label, (model, kwargs) in found.items()}


def spread(values: list[float]) -> list[float]:
    """First and third quartile, interpolated within the values (never outside them, even for two)."""
    if len(values) < 2:
        return [round(values[0], 4)] * 2
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [round(q[0], 4), round(q[2], 4)]


def inference(settings: Settings, device: torch.device) -> list[dict[str, Any]]:
    """Part 1: one row per (batch, precision, model)."""
    import timm
    from inference_speed import forward_timer, interleaved

    import models  # noqa: F401  (registers the family)
    from harness.measure import input_shape

    found = candidates(settings)
    built = {label: timm.create_model(name, **kwargs).to(device).eval() for label, (name, kwargs, _) in found.items()}
    shape = input_shape(built[f"{settings.label}/0.7"])
    dense = settings.dense_label
    rows = []
    for batch in settings.batches:
        images = torch.randn(batch, *shape, device=device)
        for precision, dtype in PRECISIONS.items():
            times, _, _ = interleaved(
                built, images, settings.rounds[batch], forward_timer(device, dtype), settings.warmup
            )
            for label, seconds in times.items():
                per_round = [d / t for d, t in zip(times[dense], seconds, strict=True)]
                rows.append(
                    {
                        "batch": batch,
                        "precision": precision,
                        "model": label,
                        "gflops": round(found[label][2], 4),
                        "flops_ratio": round(found[dense][2] / found[label][2], 4),
                        "images_per_s": round(batch / statistics.median(seconds), 2),
                        "images_per_s_iqr": [round(batch / t, 2) for t in reversed(spread(seconds))],
                        "speedup": round(statistics.median(times[dense]) / statistics.median(seconds), 4),
                        "speedup_per_round": round(statistics.median(per_round), 4),
                        "speedup_per_round_iqr": spread(per_round),
                        "rounds": len(seconds),
                    }
                )
    return rows


def train_step(settings: Settings, device: torch.device) -> list[dict[str, Any]]:
    """Part 2: the masked training step against the dense step, per precision."""
    from train_step import Precision, build_steps, time_steps

    rows = []
    for precision, dtype in PRECISIONS.items():
        steps = build_steps(
            settings.dense[0],
            settings.dynamic,
            settings.step_batch,
            *settings.step_shape,
            precision=Precision(device, dtype),
            reference=False,
        )
        times, _, _ = time_steps(steps, settings.step_rounds, settings.step_warmup, verbose=False)
        dense_ms = statistics.median(times["dense"]) * 1e3
        for name in ("dense", "dynamic", "teacher"):
            ratios = [t / d for t, d in zip(times[name], times["dense"], strict=True)]
            rows.append(
                {
                    "precision": precision,
                    "step": name,
                    "batch": settings.step_batch,
                    "ms": round(statistics.median(times[name]) * 1e3, 2),
                    "vs_dense": round(statistics.median(times[name]) * 1e3 / dense_ms, 4),
                    "per_round_ratio": round(statistics.median(ratios), 4),
                    "per_round_ratio_iqr": spread(ratios),
                    "rounds": len(times[name]),
                }
            )
    return rows


def amp_training(settings: Settings, device: torch.device) -> dict[str, Any]:
    """Part 3: `train_steps` engine steps of the tiny a/dynamic run with train.precision fp16."""
    from harness.config import RunConfig
    from harness.distributed import DistEnv
    from harness.engine import NonFiniteLoss, Trainer
    from harness.spec import load_and_expand

    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-") as tmp:
        expanded = load_and_expand(
            str(REPO / "experiments" / "table3.yaml"), scale="tiny", output_root=tmp, check_files=False
        )
        (plan,) = [p for p in expanded.runs if p.row == "a/dynamic"]
        raw = plan.config.model_dump()
        raw["teacher"].update(run_dir=None, checkpoint=str(TINY_TEACHER))  # the teacher stage's pretrained weights
        raw["train"].update(init_from=str(TINY_TEACHER), precision="fp16", seed=0)
        raw["data"].update(num_workers=0, **settings.train_data)
        raw["train"]["batch_size"] = settings.train_batch or raw["train"]["batch_size"]
        raw["output_dir"] = str(Path(tmp) / "run")
        trainer = Trainer(RunConfig.model_validate(raw), DistEnv())  # the engine's device: cuda when there is one
        losses, scales, error = [], [], ""
        batches = iter(trainer.train_loader)
        try:
            for step in range(settings.train_steps):
                try:
                    images, targets = next(batches)
                except StopIteration:
                    batches = iter(trainer.train_loader)
                    images, targets = next(batches)
                losses.append(trainer.train_step(images, targets, step)["loss"])
                scales.append(trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0)
        except NonFiniteLoss as err:
            error = str(err)
    window = max(1, min(10, len(losses) // 3))
    first, last = (statistics.mean(losses[:window]), statistics.mean(losses[-window:])) if losses else (math.nan,) * 2
    finite = not error and all(math.isfinite(v) for v in losses)
    return {
        "steps": len(losses),
        "device": str(trainer.device),
        "precision": trainer.precision,
        "grad_scaler": trainer.scaler.is_enabled(),
        "batch": trainer.cfg.train.batch_size,
        "all_finite": finite,
        "error": error,
        "loss_first": round(first, 5),
        "loss_last": round(last, 5),
        "window": window,
        "loss_went_down": bool(last < first),
        "scaler_scale_last": scales[-1] if scales else None,
        "scaler_skipped_steps": sum(b < a for a, b in itertools.pairwise(scales)),
        "losses": [round(v, 5) for v in losses],
    }


def describe(device: torch.device) -> dict[str, Any]:
    import timm
    from inference_speed import loadavg, machine

    info = {
        "device": machine(str(device)),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "load_average": loadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def markdown(result: dict[str, Any]) -> str:
    """The three parts as Markdown tables (what benchmarks/README.md takes)."""
    info = result["machine"]
    lines = [
        f"# GPU benchmark{' (smoke, CPU)' if result['smoke'] else ''}",
        "",
        f"{info['device']}; torch {info['torch']} (CUDA {info['cuda']}), timm {info['timm']}, "
        f"{info['date_utc']} UTC, load average {info['load_average']}; {result['seconds']:.0f} s in all.",
        "",
        "## Inference (eval, no_grad; interleaved rounds, warm-up excluded, device synchronised)",
        "",
        "| batch | precision | model | GFLOPs | FLOPs ratio | images/s (median) [IQR] | speed-up (ratio of medians) "
        "| median per-round speed-up [IQR] | rounds |",
        "|---:|---|---|---:|---:|---|---:|---|---:|",
    ]
    for r in result["inference"]:
        low, high = r["images_per_s_iqr"]
        q1, q3 = r["speedup_per_round_iqr"]
        lines.append(
            f"| {r['batch']} | {r['precision']} | {r['model']} | {r['gflops']:.3f} | {r['flops_ratio']:.3f}x "
            f"| {r['images_per_s']:.1f} [{low:.1f}-{high:.1f}] | {r['speedup']:.3f}x "
            f"| {r['speedup_per_round']:.3f}x [{q1:.2f}-{q3:.2f}] | {r['rounds']} |"
        )
    lines += [
        "",
        "## Training step (fwd + loss + bwd + AdamW; the masked step's teacher forward timed apart)",
        "",
        "| precision | step | batch | ms (median) | vs dense step | median per-round ratio [IQR] | rounds |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    names = {
        "dense": "dense",
        "dynamic": "DynamicViT/0.7 masked step, teacher excluded",
        "teacher": "teacher forward (no_grad)",
    }
    for r in result["train_step"]:
        q1, q3 = r["per_round_ratio_iqr"]
        lines.append(
            f"| {r['precision']} | {names[r['step']]} | {r['batch']} | {r['ms']:.1f} | {r['vs_dense']:.3f}x "
            f"| {r['per_round_ratio']:.3f}x [{q1:.2f}-{q3:.2f}] | {r['rounds']} |"
        )
    amp = result["amp_training"]
    lines += [
        "",
        f"## {amp['steps']} training steps of the tiny a/dynamic run, precision {amp['precision']}"
        f"{' + GradScaler' if amp['grad_scaler'] else ''}",
        "",
        f"- all losses finite: {'yes' if amp['all_finite'] else 'NO: ' + amp['error']}",
        f"- loss, mean of the first {amp['window']} steps {amp['loss_first']:.4f}, of the last "
        f"{amp['window']} {amp['loss_last']:.4f}: {'down' if amp['loss_went_down'] else 'NOT down'}",
        f"- GradScaler: final scale {amp['scaler_scale_last']}, {amp['scaler_skipped_steps']} step(s) "
        f"skipped (scale lowered after an inf/NaN gradient)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny sizes (CI)")
    parser.add_argument("--out", default="reports/benchmarks", help="folder for gpu.md and gpu.json")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); "
            "`--smoke` runs the same code paths on the CPU",
            file=sys.stderr,
        )
        return EXIT_NO_DEVICE
    settings, device = (SMOKE, torch.device("cpu")) if args.smoke else (GPU, torch.device("cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    result: dict[str, Any] = {"smoke": args.smoke, "machine": describe(device), "settings": asdict(settings)}
    for part, run in (("inference", inference), ("train_step", train_step), ("amp_training", amp_training)):
        began = time.perf_counter()
        result[part] = run(settings, device)
        print(f"{part}: {time.perf_counter() - began:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-smoke" if args.smoke else "gpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"written: {out / stem}.md, {out / stem}.json ({result['seconds']:.0f} s)")
    amp = result["amp_training"]
    if not args.smoke and not (amp["all_finite"] and amp["loss_went_down"]):
        print(
            f"benchmarks.gpu: the fp16 training check failed: finite {amp['all_finite']}, "
            f"loss {amp['loss_first']} -> {amp['loss_last']}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
