"""A first look: DynamicViT-S/0.7 against dense DeiT-S, GFLOPs and measured images/s.

python -m harness.demo [--batch-size 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
from typing import cast

import timm
import torch

import models  # noqa: F401  (registers the DynamicViT family with timm)
from harness.measure import count_gflops, measure_throughput
from models.dynamic_vit import DynamicVisionTransformer


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dense = timm.create_model("deit_small_patch16_224")
    pruned = cast(DynamicVisionTransformer, timm.create_model("dynamicvit_deit_small_patch16_224", keep_ratio=0.7))
    print(
        f"DynamicViT-S/0.7 keeps {pruned.num_keep} of {pruned.num_patches} tokens "
        f"before blocks {[i + 1 for i in pruned.pruning_loc]}"
    )
    g_dense, g_pruned = count_gflops(dense), count_gflops(pruned)
    print(
        f"GFLOPs (multiply-adds): dense DeiT-S {g_dense:.2f}, DynamicViT-S/0.7 {g_pruned:.2f} "
        f"({g_dense / g_pruned:.2f}x fewer)"
    )
    speed_dense = measure_throughput(dense, args.batch_size, device=args.device, warmup=2, iters=5)
    speed_pruned = measure_throughput(pruned, args.batch_size, device=args.device, warmup=2, iters=5)
    print(
        f"throughput on {args.device}, batch {args.batch_size}: dense {speed_dense.images_per_s:.1f} img/s, "
        f"pruned {speed_pruned.images_per_s:.1f} img/s "
        f"({speed_pruned.images_per_s / speed_dense.images_per_s:.2f}x); untrained weights, timing only"
    )


if __name__ == "__main__":
    main()
