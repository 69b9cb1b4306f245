"""Inference speed: dense DeiT-S (timm) against DynamicViT-S at keep ratios 0.9 / 0.8 / 0.7.

All models are measured side by side in one run, interleaved round by round so that any drift
of the machine hits every model alike; the reported rate is the median over rounds.

    python benchmarks/inference_speed.py [--batch-sizes 32 1] [--device cpu|cuda] [--rounds 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics

import timm
import torch

import models  # noqa: F401  (registers the DynamicViT family)
from harness.measure import count_gflops, measure_throughput

RATIOS = (0.9, 0.8, 0.7)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per round")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()

    candidates = {"DeiT-S (timm, dense)": timm.create_model("deit_small_patch16_224")}
    for ratio in RATIOS:
        candidates[f"DynamicViT-S/{ratio}"] = timm.create_model(
            "dynamicvit_deit_small_patch16_224", keep_ratio=ratio
        )
    gflops = {name: count_gflops(model) for name, model in candidates.items()}
    dtype = torch.bfloat16 if args.bf16 else None
    print(f"machine: {machine(args.device)}; torch {torch.__version__}, timm {timm.__version__}")
    for batch in args.batch_sizes:
        rates: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, model in candidates.items():
                result = measure_throughput(
                    model, batch, device=args.device, warmup=3, iters=args.iters, dtype=dtype
                )
                rates[name].append(result.images_per_s)
        dense_name = next(iter(candidates))
        dense_rate = statistics.median(rates[dense_name])
        print(f"\nbatch {batch}")
        print(f"| model | GFLOPs | images/s | speed-up vs dense | FLOPs ratio |")
        print(f"|---|---|---|---|---|")
        for name in candidates:
            rate = statistics.median(rates[name])
            print(
                f"| {name} | {gflops[name]:.3f} | {rate:.1f} | {rate / dense_rate:.2f}x "
                f"| {gflops[dense_name] / gflops[name]:.2f}x |"
            )


if __name__ == "__main__":
    main()
