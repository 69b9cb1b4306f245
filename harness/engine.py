"""The one training engine every run goes through: build, train, evaluate, checkpoint, log.

`run(cfg)` trains one run to the end (or resumes it from `<output_dir>/checkpoint.pth`) and
returns its final metrics. Rank 0 writes checkpoints and talks to MLflow; every rank trains.
`run(cfg, on_epoch=f)` also calls `f(epoch, metrics)` after each epoch (a search's pruner);
`f` raising `Pruned` stops the run: MLflow status KILLED, tag `trial_state=PRUNED`.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models
from harness import checkpointing as ckpt
from harness.config import RunConfig
from harness.data import DataBundle, build_data, make_loader, set_epoch
from harness.distributed import DistEnv, all_reduce_sum, barrier, init_distributed
from harness.files import write_atomic
from harness.lifecycle import RunState
from harness.losses import loss_for
from harness.measure import count_gflops, count_params_m, measure_throughput
from harness.optim import build_optimizer, build_schedule, current_lrs, gumbel_tau
from harness.tracking import UNSENT, RunTracker, TrackingUnavailable, http_client_settings

RESULT = "result.json"  # final metrics of a finished run, beside its checkpoint
INTERRUPTED_BY_HAND = "interrupted: Ctrl-C (SIGINT); the same command resumes from the last checkpoint"
# a Ctrl-C before the first checkpoint (written at each epoch's end): nothing to resume, and the same
# command opens a new MLflow run for the run key (this one stays KILLED)
INTERRUPTED_BEFORE_A_CHECKPOINT = (
    "interrupted: Ctrl-C (SIGINT) before the first checkpoint (written at each epoch's end); the same "
    "command starts over, in a new MLflow run"
)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf: the run stops, its last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR2 arrived: a checkpoint was written at the last step boundary.

    `signals`: every signal that arrived, for the job to tell a cancel (TERM alone) from SLURM's
    advance warning of a time limit or preemption (USR2, submitit's `--signal`).
    """

    def __init__(self, message: str, signals: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self.signals = signals


class Pruned(RuntimeError):
    """Raised by an `on_epoch` callback to stop a run early (a search pruning its trial).

    The run ends KILLED, not FINISHED, so that nothing that collects finished runs mistakes a
    stopped-early run for a result; its tag `trial_state=PRUNED` says why.
    """


EpochCallback = Callable[[int, dict[str, float]], None]  # (0-based epoch, that epoch's logged metrics)


class _StopSignal:
    """Turns SIGTERM/SIGUSR2 into a flag the training loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal
        self.signals: set[int] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals to the caller
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        self.signals.add(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class EpochSums:
    """Running sums of one epoch's train metrics (kept in checkpoints for exact resume)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(self.count, 1) for key, value in self.sums.items()}


def build_model(cfg: RunConfig, data: DataBundle) -> Any:
    """The student (or dense) model named by the config, sized to the data.

    Any: timm builds it by name; DynamicVisionTransformer and its peers, DynamicSwin and DynamicCNN
    share the interface the engine uses (`set_gumbel_tau`, `forward_pruned`, `num_keep`, ...) by duck typing.
    """
    m = cfg.model
    kwargs: dict[str, Any] = dict(
        variant=m.variant,
        keep_ratio=m.keep_ratio,
        num_classes=data.num_classes,
        img_size=data.img_size,
        in_chans=data.in_chans,
        drop_path_rate=m.drop_path,
        deterministic=cfg.train.deterministic,
        gumbel_tau=cfg.gumbel.tau,
    )
    for key in ("pruning_loc", "stage_ratios", "pool_after_block", "fuse_token", "tome_r"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if m.pretrained:
        kwargs["checkpoint"] = ckpt.weights_file(m.pretrained)
    model = timm.create_model(m.name, **kwargs)
    if cfg.train.init_from:
        models.load_weights(model, ckpt.weights_file(cfg.train.init_from))
    return model


def build_teacher(cfg: RunConfig, data: DataBundle) -> Any | None:
    """The frozen dense teacher of the same backbone, or None when no loss needs one (Any: as `build_model`)."""
    if not cfg.needs_teacher:
        return None
    source = cfg.teacher.checkpoint or cfg.teacher.run_dir
    if source is None:
        raise ValueError("teacher: the kl/token losses need teacher.checkpoint or teacher.run_dir, got neither")
    teacher = timm.create_model(
        cfg.teacher.model or cfg.model.name,
        variant="dense",
        num_classes=data.num_classes,
        img_size=data.img_size,
        in_chans=data.in_chans,
    )
    models.load_weights(teacher, ckpt.weights_file(source))
    return teacher.eval().requires_grad_(False)


def _criterion(cfg: RunConfig, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.label_smoothing)
    return nn.CrossEntropyLoss()


def _mixup(cfg: RunConfig, num_classes: int) -> Mixup | None:
    if cfg.aug.mixup <= 0 and cfg.aug.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.aug.mixup,
        cutmix_alpha=cfg.aug.cutmix,
        label_smoothing=cfg.aug.label_smoothing,
        num_classes=num_classes,
    )


def precision_plan(precision: str, device_type: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler scales the loss) for a run's `train.precision`.

    fp16 is the 2021 code's `torch.cuda.amp.autocast()` + NativeScaler; fp32 is HEAD's default;
    bf16 needs no scaler. Autocast applies on CUDA only: the CPU always trains in fp32.
    """
    if device_type != "cuda" or precision == "fp32":
        return None, False
    return (torch.float16, True) if precision == "fp16" else (torch.bfloat16, False)


def _skip(loader: Iterator, batches: int) -> Iterator:
    """Continue an epoch after `batches` batches (a mid-epoch resume): same order, same data."""
    for index, batch in enumerate(loader):
        if index >= batches:
            yield batch


class Trainer:
    """Holds one run's objects; `fit()` runs the epochs. Split into steps a reader can follow."""

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.out = Path(cfg.output_dir)
        self.device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        random_seed(cfg.train.seed, env.rank)  # torch, numpy (Mixup) and python RNGs
        self.data = build_data(cfg.data, cfg.aug)
        self.model = build_model(cfg, self.data).to(self.device)
        self.teacher = build_teacher(cfg, self.data)
        if self.teacher is not None:
            self.teacher.to(self.device)
        if cfg.train.channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.train_loader = make_loader(
            self.data.train,
            cfg.train.batch_size,
            train=True,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            distributed=env.enabled,
            repeated_aug=cfg.train.repeated_aug,
        )
        self.val_loader = make_loader(
            self.data.val,
            cfg.train.eval_batch_size or cfg.train.batch_size,
            train=False,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            distributed=env.enabled,
        )
        # train.accum_steps micro-batches make one optimiser update (HEAD --update_freq): steps count
        # updates, and an epoch's last incomplete update is skipped (HEAD main.py:486, engine.py:34-36)
        self.accum = cfg.train.accum_steps
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.accum_steps: must not exceed the {len(self.train_loader)} batches of an epoch, got {self.accum}"
            )
        global_batch = cfg.train.batch_size * env.world_size * self.accum
        self.optimizer = build_optimizer(self.model, cfg.optim, global_batch)
        self.lr_schedule = build_schedule(cfg.optim, global_batch, cfg.train.epochs, self.steps_per_epoch)
        self.ema = ModelEmaV3(self.model, decay=cfg.train.ema) if cfg.train.ema else None
        self.mixup = _mixup(cfg, self.data.num_classes)
        self.loss = loss_for(self.model)(cfg.losses, self.model.stage_ratios, _criterion(cfg, self.mixup))
        self.ddp: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[env.local_rank] if self.device.type == "cuda" else None)
            if env.enabled
            else self.model
        )
        dtype, scaled = precision_plan(cfg.train.precision, self.device.type)
        self.precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]  # as run
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype is not None else nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=scaled)
        self.tracker: RunTracker | None = None
        self.epoch = 0
        self.batches_done = 0
        self.sums = EpochSums()
        self.history: dict[str, float] = {}
        self.best: dict[str, float] = {}  # val/acc1_best and its epoch (and val_ema/...), as the official code reports
        self.epoch_elapsed = 0.0  # seconds the current epoch trained before a resume (epoch_time_s counts them)
        self._epoch_started = time.perf_counter()
        self.logged_upto = -1  # the last train/loss_step a killed job logged: a resume does not log it twice

    # ------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "sums": {"sums": self.sums.sums, "count": self.sums.count},
            "history": self.history,
            "best": self.best,
            "epoch_elapsed": time.perf_counter() - self._epoch_started if self.batches_done else 0.0,
            "rng": ckpt.rng_state(),
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
            "run_key": self.cfg.run_key(),
        }

    def save(self) -> None:
        if self.env.is_main:
            ckpt.save_atomic(self.state(), self.out / ckpt.CHECKPOINT)

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.sums = EpochSums(dict(state["sums"]["sums"]), state["sums"]["count"])
        self.history = dict(state["history"])
        self.best = dict(state.get("best", {}))
        self.epoch_elapsed = float(state.get("epoch_elapsed", 0.0))
        ckpt.restore_rng(state["rng"])

    # ------------------------------------------------------------------------- steps
    def _tau(self, step: int) -> float:
        total = max(1, self.cfg.train.epochs * self.steps_per_epoch - 1)
        return gumbel_tau(self.cfg.gumbel, step / total)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, step: int, micro: int = 0) -> dict[str, float]:
        """One micro-batch (`micro` of `accum_steps`) of optimiser update `step`; the update runs after the last."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.cfg.train.channels_last and self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        self.model.set_gumbel_tau(self._tau(step))
        self.lr_schedule.apply(self.optimizer, step)
        teacher_out = None
        with self.autocast():
            if self.teacher is not None:
                with torch.no_grad():
                    t = self.teacher.forward_masked(images)
                teacher_out = (t.logits, self.model.align_teacher_tokens(t.tokens))
            output = self.ddp(images)
            loss, parts = self.loss(output, targets, teacher_out)
        values = {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in parts.items()}}
        for stage in range(output.keep_fractions.shape[1]):
            values[f"keep_stage{stage + 1}"] = output.keep_fractions[:, stage].detach().mean()
        stacked = torch.stack([v.float() for v in values.values()]).cpu()
        if not torch.isfinite(stacked).all():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(values, stacked.tolist(), strict=True))
            raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {self.epoch}): {shown}")
        if micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss / self.accum).backward()  # the mean over the update's micro-batches
        if micro < self.accum - 1:
            return dict(zip(values, stacked.tolist(), strict=True))
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)  # skipped by the scaler (fp16) when a gradient is inf/NaN
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return dict(zip(values, stacked.tolist(), strict=True))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5/loss in the pruned inference path; realised keep fraction per stage.

        Runs on a copy of the torch RNG state: iterating the val loader draws a seed and the
        `random` variant draws its selections, and neither may shift the training stream, so that
        a run's training does not depend on how often it validates (`train.eval_every`).
        """
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss sum, count
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for images, targets in self.val_loader:
                images, targets = images.to(self.device), targets.to(self.device)
                with self.autocast():
                    logits = model(images).float()
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = top5 == targets[:, None]
                totals += torch.tensor(
                    [
                        hits[:, 0].sum().item(),
                        hits.any(dim=1).sum().item(),
                        nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                        len(targets),
                    ],
                    dtype=torch.float64,
                )
        totals = all_reduce_sum(totals.to(self.device), self.env).cpu()
        count = max(totals[3].item(), 1.0)
        metrics = {
            "acc1": 100 * totals[0].item() / count,
            "acc5": 100 * totals[1].item() / count,
            "loss": totals[2].item() / count,
        }
        base = getattr(model, "module", model)
        for stage, keep in enumerate(getattr(base, "num_keep", [])):
            metrics[f"keep_stage{stage + 1}"] = keep / base.num_patches
        return metrics

    def train_epoch(self, stop: _StopSignal) -> None:
        self.model.train()
        set_epoch(self.train_loader, self.epoch)
        batches = _skip(iter(self.train_loader), self.batches_done)
        quiet = not sys.stderr.isatty() or not self.env.is_main
        micro_batches = self.steps_per_epoch * self.accum
        bar = tqdm(
            batches,
            total=micro_batches,
            initial=self.batches_done,
            disable=quiet,
            desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
            leave=False,
        )
        for images, targets in bar:
            if self.batches_done >= micro_batches:  # the epoch's incomplete last update
                break
            step, micro = (
                self.epoch * self.steps_per_epoch + self.batches_done // self.accum,
                self.batches_done % self.accum,
            )
            values = self.train_step(images, targets, step, micro)
            self.sums.add(values)
            self.batches_done += 1
            if (
                self.tracker
                and micro == self.accum - 1
                and step % self.cfg.optim.log_every == 0
                and step > self.logged_upto
            ):
                self.tracker.log_metrics({"train/loss_step": values["loss"]}, step=step)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            if stop.received is not None and self.batches_done % self.accum == 0:  # at an update boundary
                self.save()
                raise Preempted(
                    f"signal {stop.received}: checkpoint written at epoch {self.epoch}, batch {self.batches_done}",
                    frozenset(stop.signals),
                )

    def validates_this_epoch(self) -> bool:
        """Every `train.eval_every` epochs and always after the last (the result is the final model's)."""
        done = self.epoch + 1
        return done % self.cfg.train.eval_every == 0 or done == self.cfg.train.epochs

    def epoch_metrics(self, epoch_seconds: float) -> dict[str, float]:
        train = {f"train/{k}": v for k, v in self.sums.means().items()}
        val: dict[str, float] = {}
        if self.validates_this_epoch():
            val = {f"val/{k}": v for k, v in self.evaluate(self.model).items()}
            if self.ema is not None:
                val.update({f"val_ema/{k}": v for k, v in self.evaluate(self.ema.module).items()})
            val.update(self.update_best(val))
        lr, lr_backbone = current_lrs(self.optimizer)
        last_step = (self.epoch + 1) * self.steps_per_epoch - 1
        extra = {"lr": lr, "lr_backbone": lr_backbone, "tau": self._tau(last_step), "epoch_time_s": epoch_seconds}
        return {k: v for k, v in {**train, **val, **extra}.items() if not math.isnan(v)}

    def update_best(self, val: dict[str, float]) -> dict[str, float]:
        """The best top-1 so far and its (0-based) epoch, per evaluated model: what the official code reports.

        Both official scripts print and keep `max_accuracy` over the epochs (2021
        main_dynamic_vit.py:528, HEAD main.py:564-570; HEAD also `max_accuracy_ema`, :586-592).
        """
        for prefix in ("val", "val_ema"):
            acc = val.get(f"{prefix}/acc1")
            if acc is not None and acc > self.best.get(f"{prefix}/acc1_best", -math.inf):
                self.best[f"{prefix}/acc1_best"] = acc
                self.best[f"{prefix}/acc1_best_epoch"] = float(self.epoch)
        return dict(self.best)

    # --------------------------------------------------------------------------- run
    def final_metrics(self) -> dict[str, float]:
        """GFLOPs, parameters and images/s of the final model, in the pruned inference path."""
        model = self.model.eval()
        batch = min(self.cfg.train.eval_batch_size or self.cfg.train.batch_size, 64)
        speed = measure_throughput(model, batch, device=self.device, warmup=2, iters=5)
        return {
            "gflops": count_gflops(model),
            "params_m": count_params_m(model),
            "throughput_img_s": speed.images_per_s,
        }

    def write_artifacts(self) -> str | None:
        """The resolved config, kept-token pictures and the final weights, to disk and MLflow.

        With `tracking.log_checkpoint` the final model is also an MLflow model (the UI's Models
        column; `mlflow.pytorch.load_model("runs:/<id>/model")`), linked to the last epoch's
        metrics; its model id (the final GFLOPs and throughput are logged linked to it too).
        """
        assert self.tracker is not None  # rank 0, the one that tracks, writes them
        resolved = self.out / "config.yaml"
        resolved.write_text(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False))
        paths = [resolved]
        n_images = self.cfg.tracking.visualize_images
        if n_images and self.model.num_keep:
            from harness.visualize import kept_token_figure  # matplotlib: imported only to draw

            images = torch.stack([self.data.val[i][0] for i in range(min(n_images, len(cast(Sized, self.data.val))))])
            with torch.no_grad():
                _, kept = self.model.eval().forward_pruned(images.to(self.device), return_positions=True)
            grid = getattr(self.model, "selection_grid", None) or tuple(
                self.model.patch_embed.grid_size
            )  # Swin/ConvNeXt: stage 3
            paths.append(
                kept_token_figure(images, kept, grid, self.data.mean, self.data.std, self.out / "kept_tokens.png")
            )
        weights = self.out / ckpt.FINAL_WEIGHTS
        ckpt.save_atomic({"model": self.model.state_dict()}, weights)
        if self.cfg.tracking.log_checkpoint:
            paths.append(weights)
        for path in paths:
            self.tracker.log_artifact(path)
        if not self.cfg.tracking.log_checkpoint:
            return None
        return self.tracker.log_pytorch_model(self.model.eval(), step=max(self.epoch - 1, 0))

    @contextmanager
    def session(self) -> Iterator[None]:
        """The run's session around training: resume from the checkpoint, open the MLflow run (the
        launcher's placeholder replaced by this job's own run), and end it as the training ends.

        Leaving normally: FINISHED. The failure branches: a stop signal (`Preempted`) ends the run
        KILLED (a requeue makes it SCHEDULED again: harness.job); MLflow gone past the outage limit
        (`TrackingUnavailable`) writes a checkpoint and the unsent points and leaves the run RUNNING
        for a relaunch; a pruned trial (`Pruned`) is KILLED, tag `trial_state=PRUNED`; any other
        exception is FAILED with tag `error`. Each state change goes through harness/lifecycle.py
        (`RunTracker.finish`). Only rank 0 has a tracker; the other ranks resume and train.
        """
        from harness import runstate  # the folder, checkpoint and MLflow run are this run key's (or refused)

        cfg = self.cfg
        state = runstate.load_checkpoint(self.out / ckpt.CHECKPOINT, cfg)
        if state is not None:
            self.restore(state)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tags = {
                "variant": cfg.model.variant,
                "run_key": cfg.run_key(),
                "model": cfg.model.name,
                "recipe": cfg.recipe,
                "precision": self.precision,
                "steps_per_epoch": str(self.steps_per_epoch),
            }  # the total of harness/progress.py's steps
            launched_as = cfg.tracking.run_id
            self.tracker = RunTracker.start(
                cfg.tracking,
                params=cfg.model_dump(),
                tags=tags,
                async_logging=True,
                resume_run_id=state["mlflow_run_id"] if state else launched_as,
                data=cfg.data,
            )
            self.tracker.resend(self.out / UNSENT)  # what an outage kept from the last job
            replaced = launched_as if launched_as and launched_as != self.tracker.run_id else None
            if replaced:  # the launcher's placeholder: from now on (and in a requeue) this job's own run
                cfg.tracking.run_id = self.tracker.run_id
            runstate.bind(self.out, cfg.run_key(), self.tracker.run_id, queued_as=replaced)
            if state is not None and self.history:  # lost if the last run was killed hard
                self.tracker.log_metrics_if_missing(self.history, step=self.epoch - 1)
            if state is not None:
                self.logged_upto = self.tracker.last_step("train/loss_step")
        try:
            yield
            if self.tracker:
                self.tracker.finish(RunState.FINISHED)
        except Preempted:
            if self.tracker:
                self.tracker.finish(RunState.KILLED)
            raise
        except TrackingUnavailable as err:  # MLflow gone too long: resumable from here by a relaunch
            self.save()
            kept = self.tracker.spill(self.out / UNSENT) if self.tracker else 0
            print(
                f"checkpoint written at epoch {self.epoch}, batch {self.batches_done}; {kept} metric points "
                f"kept in {self.out / UNSENT} for the resumed job (the MLflow run stays {RunState.RUNNING}: "
                "relaunch to resume)",
                file=sys.stderr,
            )
            raise err
        except Pruned:
            if self.tracker:
                self.tracker.set_tags({"trial_state": "PRUNED"})
                self.tracker.finish(RunState.KILLED)
            raise
        except KeyboardInterrupt:  # Ctrl-C to a run trained by hand (launched jobs ignore SIGINT)
            if self.tracker:
                resumable = (self.out / ckpt.CHECKPOINT).is_file()
                why = INTERRUPTED_BY_HAND if resumable else INTERRUPTED_BEFORE_A_CHECKPOINT
                self.tracker.finish(RunState.KILLED, reason=why)
            raise
        except BaseException as err:
            if self.tracker:
                self.tracker.finish(RunState.FAILED, reason=(str(err) or type(err).__name__)[:4000])
            raise

    def fit(self, on_epoch: EpochCallback | None = None) -> dict[str, float]:
        """Train the remaining epochs; `on_epoch` runs on rank 0 after each epoch's metrics are logged."""
        with self.session():  # resume, the MLflow run, and how it ends (FINISHED, KILLED, FAILED)
            with _StopSignal() as stop:  # TERM/USR2: a checkpoint at the next step, then `Preempted`
                while self.epoch < self.cfg.train.epochs:
                    self._epoch_started = time.perf_counter() - self.epoch_elapsed
                    self.train_epoch(stop)
                    metrics = self.epoch_metrics(time.perf_counter() - self._epoch_started)
                    self.epoch_elapsed = 0.0
                    if self.tracker:
                        self.tracker.log_metrics(metrics, step=self.epoch)
                    self.history = metrics
                    if on_epoch is not None and self.env.is_main:
                        on_epoch(self.epoch, dict(metrics))
                    self.epoch, self.batches_done, self.sums = self.epoch + 1, 0, EpochSums()
                    self.save()
            if not self.history:  # train.epochs == 0: evaluate the given weights as they are
                self.history = {f"val/{k}": v for k, v in self.evaluate(self.model).items()}
                self.history.update(self.update_best(self.history))
                if self.tracker:
                    self.tracker.log_metrics(self.history, step=0)
            barrier(self.env)
            final = {**self.history, **self.final_metrics()} if self.env.is_main else {}
            if self.tracker:
                self.record_result(final)
        return final

    def record_result(self, final: dict[str, float]) -> None:
        """The final model and metrics to MLflow, then `result.json` (the run is FINISHED right after)."""
        assert self.tracker is not None
        model_id = self.write_artifacts()
        self.tracker.log_metrics(
            {k: final[k] for k in ("gflops", "params_m", "throughput_img_s")},
            step=self.cfg.train.epochs,
            model_id=model_id,
        )
        record = {"mlflow_run_id": self.tracker.run_id, "run_key": self.cfg.run_key(), "metrics": final}
        # atomic: a half-written result.json would read as a damaged run and hide a finished one
        write_atomic(self.out / RESULT, lambda handle: handle.write(json.dumps(record, indent=2).encode()))


def run(cfg: RunConfig, on_epoch: EpochCallback | None = None) -> dict[str, float]:
    """Train (or resume, or just report) one run; returns its final metrics on rank 0.

    `on_epoch(epoch, metrics)` is called after each epoch's metrics are logged, on rank 0 only (so
    stopping early is for single-process runs); raising `Pruned` in it ends the run and re-raises.
    """
    from harness import runstate

    with runstate.failure_marks_run(cfg):  # a job that dies before training marks its run FAILED, with why
        done = runstate.finished_metrics(cfg)  # refuses a folder, result or checkpoint of another run key
        if done is not None:
            runstate.mark_finished_if_open(cfg)
            return done
        runstate.check_sources(cfg)  # never from a teacher (or init run) that has not FINISHED
        env = init_distributed()
        http_client_settings()  # our outage handling decides how long to wait for MLflow, not its client
        return Trainer(cfg, env).fit(on_epoch)
