"""Exact FLOPs and measured images/s of any model.

FLOPs: torch's FlopCounterMode on one eval-mode forward pass. timm's fused attention
(scaled_dot_product_attention) is not counted by it, so attention is switched to the explicit
matmul form while counting (the numbers are then the paper's: DeiT-S = 4.6 G). The paper's FLOP
is one multiply-add; FlopCounterMode counts two, so the result is halved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily turn off fused attention in every timm attention module of `model`."""
    modules: list[Any] = list(model.modules())  # `fused_attn`, a bool of timm's modules, is not in nn.Module's type
    saved = [(m, m.fused_attn) for m in modules if hasattr(m, "fused_attn")]
    try:
        for module, _ in saved:
            module.fused_attn = False
        yield
    finally:
        for module, fused in saved:
            module.fused_attn = fused


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm ViT expects (`in_chans`: LV-ViT's `proj` reads its conv stem, not the image)."""
    timm_model: Any = model  # timm's attributes, which nn.Module's type does not know
    if hasattr(timm_model, "input_shape"):  # Swin / ConvNeXt say it themselves (ConvNeXt has no patch_embed)
        return tuple(timm_model.input_shape)
    patch_embed = timm_model.patch_embed
    height, width = patch_embed.img_size
    return (getattr(timm_model, "in_chans", None) or patch_embed.proj.in_channels, height, width)


def count_gflops(model: nn.Module, shape: Sequence[int] | None = None) -> float:
    """Multiply-adds (in G) of one image through the eval-mode forward pass."""
    shape = tuple(shape) if shape is not None else input_shape(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), explicit_attention(model), counter:
            model(torch.zeros(1, *shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@dataclass(frozen=True)
class Throughput:
    images_per_s: float
    ms_per_batch: float
    batch_size: int
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    batch_size: int,
    shape: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    iters: int = 20,
    min_seconds: float = 0.0,
    dtype: torch.dtype | None = None,
) -> Throughput:
    """Eval-mode images/s: `warmup` untimed batches, then at least `iters` timed batches
    (and at least `min_seconds`), the median batch time giving the rate (robust to outliers)."""
    device = torch.device(device)
    shape = tuple(shape) if shape is not None else input_shape(model)
    model = model.to(device).eval()
    images = torch.randn(batch_size, *shape, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        for _ in range(warmup):
            model(images)
        _sync(device)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < iters or time.perf_counter() - start_all < min_seconds:
            start = time.perf_counter()
            model(images)
            _sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    return Throughput(batch_size / median, median * 1e3, batch_size, str(device))
