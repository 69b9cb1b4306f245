"""Training step: DynamicViT-S (masked path) against timm's dense DeiT-S, and MLflow logging overhead.

Part 1, one optimiser step on the same batch (default 16 x 3 x 224 x 224, mixup/cutmix soft
targets), every candidate measured side by side in one process, interleaved round by round (the
order alternates between rounds), medians over rounds:
  - dense: timm `deit_small_patch16_224`, train mode: forward, soft-target CE, backward, AdamW step;
  - teacher: the frozen dense teacher `dynamicvit_deit_small_patch16_224` (variant="dense"),
    `forward_masked` under no_grad (timed on its own, not part of the student step);
  - DynamicViT-S: `dynamicvit_deit_small_patch16_224` (rho 0.7), train mode (masked path, Gumbel
    decisions): forward, `DynamicViTLoss` (CE + ratio + KL + token distillation against the
    teacher's outputs), backward, AdamW step;
  - the same DynamicViT-S step with the reference masked softmax (`fused_masked_attn = False`:
    autograd through the materialised B x H x N x N attention weights), for comparison.
All optimisers are the harness's recipe (`harness.optim.build_optimizer`, AdamW).

Part 2, MLflow logging overhead (`--logging`): the engine logs through `RunTracker` with
`async_logging=True`. A training step of the tiny scale (`dynamicvit_tiny_patch8_64`, batch 128,
1 x 64 x 64, teacher included) is timed in blocks of steps with and without one `log_metrics`
call per step (8 values) into a local SQLite store in a temporary folder; each logged block ends
with `flush()`, so the background thread's work is inside the timed block. Blocks alternate; the
overhead is the median of (logged - plain) over adjacent block pairs. The engine itself logs once
every `optim.log_every` = 20 steps, so its real overhead is that figure / 20.

    python benchmarks/train_step.py [--batch 16] [--rounds 16] [--no-logging] [--log-pairs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_speed import loadavg, quartiles, wait_for_idle
from inference_speed import machine as cpu_machine

import models
from harness.config import LossConfig, OptimConfig, TrackingConfig
from harness.losses import DynamicViTLoss
from harness.optim import build_optimizer
from harness.tracking import RunTracker
from models.masked_attention import MaskedAttention


def machine() -> str:
    return f"{cpu_machine('cpu')}; torch {torch.__version__}, timm {timm.__version__}"


def soft_batch(batch: int, chans: int, size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch with mixup/cutmix soft targets (the official recipe's augmentation)."""
    torch.manual_seed(seed)
    images = torch.randn(batch, chans, size, size)
    labels = torch.randint(0, classes, (batch,))
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
    return mixup(images, labels)


CPU = torch.device("cpu")


class Precision:
    """Where a step runs: the device (synchronised around the clock on CUDA, which runs asynchronously)
    and the autocast dtype of forward and loss (None: fp32), with a GradScaler for fp16 as the engine has."""

    def __init__(self, device: torch.device = CPU, autocast: torch.dtype | None = None) -> None:
        self.device, self.dtype = device, autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


FP32_CPU = Precision()


class DenseStep:
    """timm's dense ViT: forward, soft-target CE, backward, AdamW step."""

    def __init__(
        self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, precision: Precision = FP32_CPU
    ) -> None:
        self.model = model.train()
        self.images, self.targets = images, targets
        self.criterion = SoftTargetCrossEntropy()
        self.optimizer = build_optimizer(model, OptimConfig(), images.shape[0])
        self.precision = precision

    def __call__(self) -> float:
        self.precision.sync()
        start = time.perf_counter()
        with self.precision.autocast():
            output = self.model(self.images)  # our dense variant answers a DynamicViTOutput in train mode
            loss = self.criterion(getattr(output, "logits", output), self.targets)
        self.precision.backward_step(loss, self.optimizer)
        self.precision.sync()
        return time.perf_counter() - start


class DynamicStep:
    """The engine's DynamicViT step: teacher forward (timed apart), masked forward, loss, backward, AdamW."""

    def __init__(
        self,
        model: models.DynamicVisionTransformer,
        teacher: torch.nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        precision: Precision = FP32_CPU,
    ) -> None:
        self.model = model.train()
        self.teacher = teacher.eval().requires_grad_(False)
        self.images, self.targets = images, targets
        self.loss = DynamicViTLoss(LossConfig(), model.stage_ratios, SoftTargetCrossEntropy())
        self.optimizer = build_optimizer(model, OptimConfig(), images.shape[0])
        self.precision = precision
        self.last_loss: dict[str, float] = {}

    def __call__(self) -> tuple[float, float]:
        """(teacher seconds, student step seconds)."""
        self.precision.sync()
        start = time.perf_counter()
        with torch.no_grad(), self.precision.autocast():
            t = self.teacher.forward_masked(self.images)
        teacher_out = (t.logits, self.model.align_teacher_tokens(t.tokens))
        self.precision.sync()
        mid = time.perf_counter()
        with self.precision.autocast():
            output = self.model(self.images)
            loss, parts = self.loss(output, self.targets, teacher_out)
        self.precision.backward_step(loss, self.optimizer)
        self.precision.sync()
        end = time.perf_counter()
        self.last_loss = {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in parts.items()}}
        for stage in range(output.keep_fractions.shape[1]):
            self.last_loss[f"keep_stage{stage + 1}"] = output.keep_fractions[:, stage].detach().mean()
        return mid - start, end - mid


def set_fused_masked_attn(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, MaskedAttention):
            module.fused_masked_attn = fused
    return model


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def build_steps(
    dense_name: str,
    dynamic_name: str,
    batch: int,
    chans: int,
    size: int,
    classes: int,
    precision: Precision = FP32_CPU,
    reference: bool = True,
) -> dict[str, Callable[[], object]]:
    """The candidates on one fixed soft-target batch: `dense` (the timm dense model `dense_name`, or
    `dynamic_name` with variant dense when they are the same), `dynamic` (`dynamic_name` at rho 0.7,
    the fused masked attention) and, with `reference`, `dynamic_ref` (the reference masked softmax)."""
    device = precision.device
    images, targets = (t.to(device) for t in soft_batch(batch, chans, size, classes))
    torch.manual_seed(0)
    kwargs = {"variant": "dense"} if dense_name == dynamic_name else {}
    dense = timm.create_model(dense_name, num_classes=classes, **kwargs)
    teacher = timm.create_model(dynamic_name, num_classes=classes, variant="dense")
    teacher.load_state_dict(dense.state_dict())  # same backbone weights, as a real teacher would be
    student = timm.create_model(dynamic_name, num_classes=classes, keep_ratio=0.7)
    student.load_state_dict({**student.state_dict(), **dense.state_dict()})
    steps: dict[str, Callable[[], object]] = {
        "dense": DenseStep(dense.to(device), images, targets, precision),
        "dynamic": DynamicStep(student.to(device), teacher.to(device), images, targets, precision),
    }
    if reference:
        ref = timm.create_model(dynamic_name, num_classes=classes, keep_ratio=0.7)
        ref.load_state_dict(student.state_dict())
        steps["dynamic_ref"] = DynamicStep(
            set_fused_masked_attn(ref, False).to(device), teacher, images, targets, precision
        )
    return steps


def time_steps(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    per_round: int = 1,
    idle_wait: float = 0.0,
    verbose: bool = True,
) -> tuple[dict[str, list[float]], float, int]:
    """Interleaved rounds (the order reverses every other round) of `per_round` steps per candidate after
    `warmup` untimed ones. Returns (seconds: dense, teacher, dynamic, dynamic_ref), waited s, busy rounds)."""
    times: dict[str, list[float]] = {"dense": [], "teacher": [], "dynamic": [], "dynamic_ref": []}
    if verbose:
        print(f"warm-up ({warmup} steps each) ...", flush=True)
    for _ in range(warmup):
        for step in steps.values():
            step()
    if verbose:
        print(f"load average before: {loadavg()}", flush=True)
    names = list(steps)
    waited, busy_rounds = 0.0, 0
    for round_ in range(rounds):
        if idle_wait > 0:
            seconds, busy = wait_for_idle(idle_wait)
            waited, busy_rounds = waited + seconds, busy_rounds + (busy > 0)
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(per_round):
                result = steps[name]()
                if name == "dense":
                    times["dense"].append(result)  # type: ignore[arg-type]
                else:
                    teacher_s, student_s = result  # type: ignore[misc]
                    times["teacher"].append(teacher_s)
                    times[name].append(student_s)
        if verbose:
            print(
                f"  round {round_ + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
                flush=True,
            )
    return times, waited, busy_rounds


def step_benchmark(args: argparse.Namespace) -> dict[str, float]:
    steps = build_steps(
        "deit_small_patch16_224",
        "dynamicvit_deit_small_patch16_224",
        args.batch,
        3,
        224,
        1000,
        reference=not args.no_reference,
    )
    times, waited, busy_rounds = time_steps(steps, args.rounds, args.warmup, args.steps, args.idle_wait)
    load = loadavg()
    dense_ms = median_ms(times["dense"])

    def per_round(name: str) -> str:
        ratios = [s / d for s, d in zip(times[name], times["dense"], strict=True)]
        low, high = quartiles(ratios)
        return f"{statistics.median(ratios):.3f}x [{low:.2f}-{high:.2f}]"

    print(f"\nmachine: {machine()}")
    print(
        f"load average (1/5/15 min) after: {load}; waited {waited:.0f} s for an idle CPU, "
        f"{busy_rounds} round(s) started with other processes running"
    )
    print(f"batch {args.batch} x 3 x 224 x 224, {args.rounds} rounds x {args.steps} step(s), medians\n")
    print("| step | ms (median) | vs dense step (ratio of medians) | median of per-round ratios [IQR] |")
    print("|---|---|---|---|")
    print(f"| DeiT-S dense (timm): fwd + CE + bwd + AdamW | {dense_ms:.0f} | 1.00x | 1.00x |")
    rows = [("dynamic", "DynamicViT-S/0.7 masked step, fused masked attention (teacher excluded)")]
    if "dynamic_ref" in steps:
        rows.append(("dynamic_ref", "DynamicViT-S/0.7 masked step, reference masked softmax (teacher excluded)"))
    for name, label in rows:
        ms = median_ms(times[name])
        print(f"| {label} | {ms:.0f} | {ms / dense_ms:.3f}x | {per_round(name)} |")
    teacher_ms = median_ms(times["teacher"])
    print(f"| teacher forward (dense DeiT-S, no_grad), per step | {teacher_ms:.0f} | {teacher_ms / dense_ms:.3f}x | |")
    dyn_ms = median_ms(times["dynamic"])
    print(
        f"| DynamicViT-S/0.7 step including the teacher | {dyn_ms + teacher_ms:.0f} | "
        f"{(dyn_ms + teacher_ms) / dense_ms:.3f}x | |"
    )
    return {"dense_ms": dense_ms, "dynamic_ms": dyn_ms, "teacher_ms": teacher_ms}


def logging_benchmark(args: argparse.Namespace, deit_step_ms: float | None) -> None:
    images, targets = soft_batch(128, 1, 64, 10)
    torch.manual_seed(0)
    student = timm.create_model("dynamicvit_tiny_patch8_64", keep_ratio=0.7)
    teacher = timm.create_model("dynamicvit_tiny_patch8_64", variant="dense")
    step = DynamicStep(student, teacher, images, targets)
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrackingConfig(uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}", experiment="train-step-overhead")
        tracker = RunTracker.start(cfg, params={"benchmark": "train_step"}, async_logging=True)
        sync_tracker = RunTracker.start(cfg, params={"benchmark": "train_step_sync"}, async_logging=False)
        counter = [0]

        def block(log: bool) -> float:
            start = time.perf_counter()
            for _ in range(args.log_block):
                step()
                if log:
                    counter[0] += 1
                    tracker.log_metrics({k: float(v) for k, v in step.last_loss.items()}, step=counter[0])
            if log:
                tracker.flush()
            return (time.perf_counter() - start) / args.log_block

        block(True), block(False)  # warm the store and the thread
        pairs: list[tuple[float, float]] = []
        waited, busy_pairs = 0.0, 0
        for i in range(args.log_pairs):
            if args.idle_wait > 0:
                seconds, busy = wait_for_idle(args.idle_wait)
                waited, busy_pairs = waited + seconds, busy_pairs + (busy > 0)
            if i % 2 == 0:
                logged = block(True)
                plain = block(False)
            else:
                plain = block(False)
                logged = block(True)
            pairs.append((logged, plain))
        values = {k: float(v) for k, v in step.last_loss.items()}
        call_s, sync_s = [], []
        for i in range(50):  # the foreground cost of one async call, and the work it hands over
            start = time.perf_counter()
            tracker.log_metrics(values, step=10_000 + i)
            call_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            sync_tracker.log_metrics(values, step=10_000 + i)
            sync_s.append(time.perf_counter() - start)
        tracker.finish()
        sync_tracker.finish()
    load = loadavg()
    plain_ms = median_ms([p for _, p in pairs])
    logged_ms = median_ms([lg for lg, _ in pairs])
    diffs = [(lg - p) * 1e3 for lg, p in pairs]
    diff_ms = statistics.median(diffs)
    diff_low, diff_high = quartiles(diffs)
    sync_ms = median_ms(sync_s)
    print(
        f"\nMLflow logging overhead: tiny scale (dynamicvit_tiny_patch8_64, batch 128 x 1 x 64 x 64, "
        f"teacher included), SQLite in a temp dir, async_logging=True, {len(values)} values per call; "
        f"{args.log_pairs} block pairs x {args.log_block} steps; load average after: {load}; "
        f"waited {waited:.0f} s for an idle CPU, {busy_pairs} pair(s) started with other processes running\n"
    )
    print("| quantity | ms | % of tiny step | % of DeiT-S dense step |")
    print("|---|---|---|---|")

    def row(label: str, ms: float) -> None:
        deit = f"{100 * ms / deit_step_ms:.2f}%" if deit_step_ms else "n/a"
        print(f"| {label} | {ms:.2f} | {100 * ms / plain_ms:.2f}% | {deit} |")

    print(f"| tiny step without logging (median) | {plain_ms:.1f} | | |")
    print(f"| tiny step with one log_metrics per step (median, flush at block end) | {logged_ms:.1f} | | |")
    row("overhead per logged step: median of paired (logged - plain)", diff_ms)
    print(f"| (interquartile range of the paired differences) | {diff_low:.1f} to {diff_high:.1f} | | |")
    row("same, amortised at log_every = 20 (the engine)", diff_ms / 20)
    row("foreground cost of one async log_metrics call", median_ms(call_s))
    row("work one call hands to the thread (same call, sync mode)", sync_ms)
    row("that work, amortised at log_every = 20", sync_ms / 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=16, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per candidate per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference masked-softmax student")
    parser.add_argument("--no-steps", action="store_true", help="only the logging overhead")
    parser.add_argument("--no-logging", action="store_true", help="skip the MLflow logging overhead")
    parser.add_argument("--log-pairs", type=int, default=30, help="logged/plain block pairs")
    parser.add_argument("--log-block", type=int, default=4, help="steps per block")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        help="before each round, wait up to this many seconds for other processes to leave the CPU (0: never wait)",
    )
    parser.add_argument(
        "--deit-step-ms",
        type=float,
        default=None,
        help="DeiT-S dense step time (ms) for the logging table when --no-steps",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}; load average: {loadavg()}", flush=True)
    deit_ms = args.deit_step_ms
    if not args.no_steps:
        result = step_benchmark(args)
        deit_ms = result["dense_ms"]
    if not args.no_logging:
        logging_benchmark(args, deit_ms)


if __name__ == "__main__":
    main()
