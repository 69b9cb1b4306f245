"""Inference speed: a dense timm backbone against its DynamicViT at several keep ratios.

`--family deit` (default): DeiT-S against DynamicViT-S at keep ratios 0.9 / 0.8 / 0.7;
`--family swin`: Swin-T against DynamicSwin-T, `--family convnext`: ConvNeXt-T against DynamicCNN-T,
both at 0.9 / 0.7 (the T-PAMI zoo's ratios; only their third stage is sparsified);
`--family lvvit`: LV-ViT-S against DynamicViT-LV-ViT-S at 0.7 / 0.5 (the zoo's ratios). timm has
no LV-ViT: the dense model is the registered LV-ViT-S with `variant="dense"` (the official
LV-ViT-S, whose TokenLabeling weights load into it).

All models are measured side by side in one process, interleaved batch by batch: a round times
one batch of every model (the order reverses every other round), so that drift or another
process on the machine hits the models of one round alike. Reported per model: the median batch
time over rounds as images/s, the speed-up as the ratio of those medians and as the median of
the per-round ratios (each the dense batch time over the model's batch time in the same round),
with its interquartile range, and the FLOPs ratio (multiply-adds of one image, predictors
included, `harness.measure.count_gflops`). Eval mode, no_grad, the pruned (gathered) path.
Before a round (at most every `--gate-every` seconds) the script waits up to `--idle-wait`
seconds until no other process is runnable, and reports how long it waited.

    python benchmarks/inference_speed.py [--batch-sizes 32 1] [--rounds 30 200]
                                         [--device cpu|cuda] [--bf16] [--family deit|swin|convnext|lvvit]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: F401  (registers the DynamicViT family)
from harness.measure import count_gflops, input_shape

RATIOS = (0.9, 0.8, 0.7)
# family -> (dense label, dense model name, dynamic label, registered dynamic name, default keep ratios)
FAMILIES = {
    "deit": (
        "DeiT-S (timm, dense)",
        "deit_small_patch16_224",
        "DynamicViT-S",
        "dynamicvit_deit_small_patch16_224",
        RATIOS,
    ),
    "swin": (
        "Swin-T (timm, dense)",
        "swin_tiny_patch4_window7_224",
        "DynamicSwin-T",
        "dynamicswin_tiny_patch4_window7_224",
        (0.9, 0.7),
    ),
    "convnext": ("ConvNeXt-T (timm, dense)", "convnext_tiny", "DynamicCNN-T", "dynamicconvnext_tiny", (0.9, 0.7)),
    "lvvit": (
        "LV-ViT-S (dense)",
        "dynamicvit_lvvit_small_patch16_224",
        "DynamicViT-LV-ViT-S",
        "dynamicvit_lvvit_small_patch16_224",
        (0.7, 0.5),
    ),
}
DENSE_KWARGS = {"lvvit": {"variant": "dense"}}  # a family without a timm dense model: ours, dense


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({platform.machine()}) CPU, {torch.get_num_threads()} torch threads"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def others_running(samples: int = 5, interval: float = 0.1) -> int:
    """How many runnable threads other than this one, at most over a few samples of /proc/stat
    (taken while this process computes nothing, so its own torch threads are idle)."""
    busiest = 0
    for _ in range(samples):
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running"):
                    busiest = max(busiest, int(line.split()[1]) - 1)
        except OSError:
            return 0
        time.sleep(interval)
    return busiest


def wait_for_idle(max_wait_s: float, threshold: int = 0) -> tuple[float, int]:
    """Before a round: wait (at most `max_wait_s`) until no other thread is runnable.
    Returns (seconds waited, runnable others at the last check)."""
    start = time.perf_counter()
    busy = others_running()
    while busy > threshold and time.perf_counter() - start < max_wait_s:
        time.sleep(1.0)
        busy = others_running()
    return time.perf_counter() - start, busy


def per_batch(values: list[int], batches: list[int], name: str) -> list[int]:
    if len(values) == 1:
        return values * len(batches)
    if len(values) != len(batches):
        raise SystemExit(f"--{name}: give one value or one per batch size ({len(batches)}), got {values}")
    return values


class PartTimer:
    """Forward hooks that add up the wall time of every block (by its token count) and of every
    token-score predictor of a model; `rest` = total - parts (embedding, selection, head)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parts: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self.handles = []
        modules = [("blocks N={}", b) for b in model.blocks]
        modules += [("predictors", m) for m in getattr(model, "score_predictor", [])]
        for label, module in modules:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post(label)))

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, label: str):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            key = label.format(args[0].shape[1]) if "{}" in label else label
            self.parts[key] = self.parts.get(key, 0.0) + time.perf_counter() - self._start[id(module)]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def breakdown(models_: dict[str, torch.nn.Module], batch: int, rounds: int, timed) -> None:
    """Median ms per forward pass of each part, dense vs DynamicViT, interleaved by batch."""
    first = next(iter(models_.values()))
    images = torch.randn(batch, *input_shape(first), device=next(first.parameters()).device)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models_}
    timers = {name: PartTimer(model) for name, model in models_.items()}
    for model in models_.values():
        timed(model, images)
    for _ in range(rounds):
        for name, model in models_.items():
            timers[name].parts = {}
            total = timed(model, images)
            parts = dict(timers[name].parts)
            parts["embedding, token selection, head"] = total - sum(parts.values())
            parts["total"] = total
            for key, value in parts.items():
                samples[name].setdefault(key, []).append(value)
    for timer in timers.values():
        timer.remove()
    print(
        f"\nwhere the time goes, batch {batch} ({rounds} interleaved rounds, median ms per forward pass; "
        f"load average {loadavg()})"
    )
    print("| part | " + " | ".join(models_) + " |")
    print("|---|" + "---|" * len(models_))
    keys: list[str] = []
    for name in models_:
        keys += [k for k in samples[name] if k not in keys and k != "total"]
    keys.append("total")
    for key in keys:
        cells = [f"{statistics.median(samples[n][key]) * 1e3:.1f}" if key in samples[n] else "" for n in models_]
        print(f"| {key} | " + " | ".join(cells) + " |")


def forward_timer(
    device: torch.device, autocast: torch.dtype | None = None
) -> Callable[[torch.nn.Module, torch.Tensor], float]:
    """Seconds of one eval forward pass (no_grad, under autocast to `autocast` if given), the device
    synchronised before and after (CUDA runs asynchronously: without it the clock measures the launch)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def timed(model: torch.nn.Module, images: torch.Tensor) -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            model(images)
        sync()
        return time.perf_counter() - start

    return timed


def interleaved(
    candidates: dict[str, torch.nn.Module],
    images: torch.Tensor,
    rounds: int,
    timed: Callable[[torch.nn.Module, torch.Tensor], float],
    warmup: int = 3,
    idle_wait: float = 0.0,
    gate_every: float = 5.0,
) -> tuple[dict[str, list[float]], float, int]:
    """Every model's batch times, side by side: `warmup` untimed batches each, then `rounds` rounds of
    one timed batch per model, the order reversed every other round (drift and other processes hit
    the models of a round alike). With `idle_wait`, before a round (at most every `gate_every` s) wait
    for an idle CPU. Returns (seconds per model, seconds waited, checks that found others running)."""
    names = list(candidates)
    for model in candidates.values():
        for _ in range(warmup):
            timed(model, images)
    times: dict[str, list[float]] = {name: [] for name in names}
    waited, busy_rounds, last_gate = 0.0, 0, -float("inf")
    for round_ in range(rounds):
        if idle_wait > 0 and time.perf_counter() - last_gate >= gate_every:
            seconds, busy = wait_for_idle(idle_wait)
            waited, busy_rounds = waited + seconds, busy_rounds + (busy > 0)
            last_gate = time.perf_counter()
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(timed(candidates[name], images))
    return times, waited, busy_rounds


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--rounds",
        type=int,
        nargs="+",
        default=[30, 200],
        help="interleaved rounds, one batch per model each (one value, or one per batch size)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per model first")
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="deit",
        help="deit: DeiT-S vs DynamicViT-S; swin: Swin-T vs DynamicSwin-T; convnext: ConvNeXt-T "
        "vs DynamicCNN-T; lvvit: LV-ViT-S vs DynamicViT-LV-ViT-S",
    )
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help="keep ratios (default: 0.9 0.8 0.7 for deit, 0.9 0.7 for swin and convnext, 0.7 0.5 for lvvit)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        help="wait up to this many seconds for other processes to leave the CPU before a round (0: never wait)",
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time the parts (blocks by token count, predictors, rest) of the dense "
        "model and the last keep ratio's model, over this many rounds per batch size",
    )
    parser.add_argument(
        "--gate-every",
        type=float,
        default=5.0,
        help="check for other processes before a round at most every this many seconds",
    )
    args = parser.parse_args()
    rounds = per_batch(args.rounds, args.batch_sizes, "rounds")
    device = torch.device(args.device)
    dense_label, dense_model, label, dynamic_model, default_ratios = FAMILIES[args.family]
    if args.breakdown and args.family != "deit":
        raise SystemExit(f"--breakdown: times the DeiT family's blocks by token count, got --family {args.family}")

    candidates = {dense_label: timm.create_model(dense_model, **DENSE_KWARGS.get(args.family, {}))}
    for ratio in args.ratios or default_ratios:
        candidates[f"{label}/{ratio}"] = timm.create_model(dynamic_model, keep_ratio=ratio)
    shape = input_shape(list(candidates.values())[-1])  # timm's ConvNeXt has no patch_embed to ask
    gflops = {name: count_gflops(model, shape) for name, model in candidates.items()}
    for model in candidates.values():
        model.to(device).eval()
    timed = forward_timer(device, torch.bfloat16 if args.bf16 else None)

    print(f"machine: {machine(args.device)}; torch {torch.__version__}, timm {timm.__version__}")
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    names = list(candidates)
    dense_name = names[0]
    for batch, n_rounds in zip(args.batch_sizes, rounds, strict=True):
        images = torch.randn(batch, *shape, device=device)
        load_before = loadavg()
        times, waited, busy_rounds = interleaved(
            candidates, images, n_rounds, timed, args.warmup, args.idle_wait, args.gate_every
        )
        dense_time = statistics.median(times[dense_name])
        print(
            f"\nbatch {batch}: {n_rounds} rounds (one batch per model each); load average "
            f"(1/5/15 min) before {load_before}, after {loadavg()}; waited {waited:.0f} s for an "
            f"idle CPU, {busy_rounds} check(s) still found other processes running"
        )
        print(
            "| model | GFLOPs | images/s (median) | speed-up vs dense (ratio of medians) "
            "| median per-round speed-up [IQR] | FLOPs ratio |"
        )
        print("|---|---|---|---|---|---|")
        for name in names:
            median = statistics.median(times[name])
            per_round = [d / t for d, t in zip(times[dense_name], times[name], strict=True)]
            low, high = quartiles(per_round)
            print(
                f"| {name} | {gflops[name]:.3f} | {batch / median:.1f} | {dense_time / median:.3f}x "
                f"| {statistics.median(per_round):.3f}x [{low:.2f}-{high:.2f}] "
                f"| {gflops[dense_name] / gflops[name]:.3f}x |"
            )
        if args.breakdown:
            if args.idle_wait > 0:
                wait_for_idle(args.idle_wait)
            breakdown({n: candidates[n] for n in (dense_name, names[-1])}, batch, args.breakdown, timed)


if __name__ == "__main__":
    main()
