"""Each peer method's knob at a target cost, computed with the harness's own FLOP counter.

    python -m analysis.peers_match [--model NAME] [--tolerance 0.02]      # print the matched knobs
    python -m analysis.peers_match --check experiments/peers.yaml         # verify a spec's knobs

The target is DynamicViT/0.7's GFLOPs on the same backbone (`harness.measure.count_gflops`,
multiply-adds, its predictors included: DeiT-S 2.965, the tiny ViT 0.0414). Rules, so that
nobody picks a knob by hand:
  - keep ratios (evit, topk): the value on a 0.01 grid whose GFLOPs are closest to the target
    (GFLOPs grow with the ratio, so a bisection finds the crossing, then the nearer neighbour);
  - tome_r: the constant r closest to the target; if that misses by more than the tolerance, the
    per-block schedule "r + 1 in the first k blocks, r after" closest to it;
  - structural: the pooling block closest to the target (an integer knob: it may miss).
TokenReduction's keep rates (the second group) are not matched but translated: rate rho keeps
int(N * rho**s) tokens at stage s for Top-K, EViT (`stage_ratios`) and DynamicViT, and ToMe merges
the difference at the same blocks (a per-block `tome_r`, capped at half the tokens as ToMe caps it).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

TARGET = {"variant": "dynamic", "keep_ratio": 0.7}
TR_RATES = (0.5, 0.7, 0.9)
KEEP_GRID = (30, 100)  # keep ratios 0.30 .. 1.00 in steps of 0.01


@cache
def _gflops(name: str, frozen: tuple[tuple[str, Any], ...]) -> float:
    import timm
    import torch

    import models  # noqa: F401  (registers the family)
    from harness.measure import count_gflops

    kwargs: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}
    with torch.device("meta"):  # shapes only: the count depends on no value, and DeiT-S builds in a blink
        model = timm.create_model(name, **kwargs)
    return count_gflops(model)


def gflops(name: str, **kwargs: Any) -> float:
    """GFLOPs of `name` built with `kwargs` (cached: the searches ask for the same models again)."""
    return _gflops(name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))


@dataclass(frozen=True)
class Match:
    method: str
    knob: dict[str, Any]
    gflops: float
    target: float

    @property
    def gap(self) -> float:
        return self.gflops / self.target - 1.0

    def line(self) -> str:
        knob = ", ".join(f"{k}: {v}" for k, v in self.knob.items())
        return f"{self.method:14s} {{{knob}}}  {self.gflops:.4f} G  ({100 * self.gap:+.2f}% of {self.target:.4f})"


def _nearest(cost: Any, low: int, high: int, target: float) -> int:
    """The integer in [low, high] whose cost (non-decreasing) is closest to target."""
    lo, hi = low, high
    while lo < hi:  # first value whose cost reaches the target
        mid = (lo + hi) // 2
        if cost(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [v for v in (lo - 1, lo) if low <= v <= high]
    return min(candidates, key=lambda v: abs(cost(v) - target))


def match_keep(name: str, method: str, target: float, **fixed: Any) -> Match:
    cost = lambda k: gflops(name, keep_ratio=k / 100, **fixed)  # noqa: E731
    k = _nearest(cost, *KEEP_GRID, target)
    return Match(
        method, {"keep_ratio": k / 100, **{k_: v for k_, v in fixed.items() if k_ != "variant"}}, cost(k), target
    )


def match_tome(name: str, target: float, tolerance: float, depth: int, tokens: int) -> Match:
    def constant(r: int) -> float:
        return gflops(name, variant="tome", tome_r=r)

    r = _nearest(lambda v: -constant(v), 0, tokens // 2, -target)  # cost falls as r grows
    best = Match("tome", {"tome_r": r}, constant(r), target)
    if abs(best.gap) <= tolerance:
        return best
    base = r if constant(r) > target else r - 1  # r + 1 in the first blocks lowers the cost
    schedules = [[base + 1] * k + [base] * (depth - k) for k in range(1, depth)]
    found = [Match("tome", {"tome_r": s}, gflops(name, variant="tome", tome_r=s), target) for s in schedules]
    return min([best, *found], key=lambda m: abs(m.gap))


def match_structural(name: str, target: float, depth: int) -> Match:
    found = [
        Match("structural", {"pool_after_block": b}, gflops(name, variant="structural", pool_after_block=b), target)
        for b in range(1, depth)
    ]
    return min(found, key=lambda m: abs(m.gap))


def matched(name: str, tolerance: float = 0.02) -> tuple[float, list[Match]]:
    """DynamicViT/0.7's GFLOPs on `name` and every method's matched knob."""
    from harness.catalog import MODEL_DEFAULTS

    spec = MODEL_DEFAULTS[name]
    depth, tokens = spec["depth"], (spec["img_size"] // spec["patch_size"]) ** 2
    target = gflops(name, **TARGET)
    return target, [
        Match("dynamicvit", {"keep_ratio": TARGET["keep_ratio"]}, target, target),
        match_keep(name, "evit", target, variant="evit", fuse_token=True),
        match_keep(name, "evit-unfused", target, variant="evit", fuse_token=False),
        match_keep(name, "topk", target, variant="topk"),
        match_tome(name, target, tolerance, depth, tokens),
        match_structural(name, target, depth),
    ]


def tr_tome_schedule(name: str, rate: float) -> list[int]:
    """ToMe at TokenReduction's keep rate: merge down to int(N * rate**s) at each pruning location."""
    from harness.catalog import MODEL_DEFAULTS

    spec = MODEL_DEFAULTS[name]
    tokens = (spec["img_size"] // spec["patch_size"]) ** 2
    schedule, current = [0] * spec["depth"], tokens
    for s, loc in enumerate(spec["pruning_loc"]):
        want = int(tokens * rate ** (s + 1))
        schedule[loc] = min(current - want, current // 2)  # ToMe's cap: half the non-CLS tokens
        current -= schedule[loc]
    return schedule[: max(spec["pruning_loc"]) + 1]


def tr_knobs(name: str, rate: float) -> dict[str, dict[str, Any]]:
    """Each method's model arguments at TokenReduction's keep rate `rate` (the same token counts)."""
    ratios = [round(rate ** (s + 1), 6) for s in range(3)]
    return {
        "dynamicvit": {"variant": "dynamic", "keep_ratio": rate},
        "topk": {"variant": "topk", "keep_ratio": rate},
        "evit": {"variant": "evit", "stage_ratios": ratios},
        "tome": {"variant": "tome", "tome_r": tr_tome_schedule(name, rate)},
    }


def knob_equal(a: Any, b: Any, depth: int) -> bool:
    """Knob values equal: numbers to float precision; lists after padding with zeros (tome_r's missing blocks)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        pad_a, pad_b = ([float(x) for x in v] + [0.0] * (depth - len(v)) for v in (a, b))
        return len(pad_a) == len(pad_b) and all(
            math.isclose(x, y, abs_tol=1e-9) for x, y in zip(pad_a, pad_b, strict=True)
        )
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)) or a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), abs_tol=1e-9)


def tr_group(name: str) -> list[tuple[float, str, dict[str, Any], float]]:
    """(rate, method, knob, GFLOPs) at TokenReduction's keep rates."""
    return [
        (rate, method, knob, gflops(name, **knob)) for rate in TR_RATES for method, knob in tr_knobs(name, rate).items()
    ]


def check_spec(path: str, tolerance: float = 0.02) -> list[str]:
    """Problems with a peers spec, one line each: a `matched` run whose GFLOPs miss the target by
    more than the tolerance (the structural row excepted: its knob is an integer), or a keep-rate
    run (row `tr/<method>/<rate>`) whose knobs are not TokenReduction's translation of its rate."""
    from harness.catalog import MODEL_DEFAULTS
    from harness.spec import load_and_expand

    problems = []
    for scale in ("tiny", "paper"):
        expanded = load_and_expand(path, scale=scale, check_files=False)
        for plan in expanded.runs:
            m = plan.config.model
            if plan.row.startswith("tr/"):
                _, method, rate = plan.row.split("/")
                want = tr_knobs(m.name, float(rate))[method]
                depth = MODEL_DEFAULTS[m.name]["depth"]
                if m.variant != want["variant"] or not all(
                    knob_equal(getattr(m, k), v, depth) for k, v in want.items() if k != "variant"
                ):
                    problems.append(
                        f"{path}: {scale} {plan.stage}/{plan.name}: knobs are not TokenReduction's "
                        f"rate {rate} for {method}: want {want}"
                    )
                continue
            if plan.stage not in ("matched", "tome_off_shelf"):
                continue
            if m.variant in ("dense", "structural"):
                continue
            target = gflops(m.name, **TARGET)
            kwargs = {
                k: v
                for k, v in m.model_dump().items()
                if k in ("variant", "keep_ratio", "fuse_token", "tome_r", "stage_ratios") and v is not None
            }
            got = gflops(m.name, **kwargs)
            if abs(got / target - 1) > tolerance:
                problems.append(
                    f"{path}: {scale} {plan.stage}/{plan.name}: {got:.4f} GFLOPs, "
                    f"{100 * (got / target - 1):+.2f}% of DynamicViT/0.7's {target:.4f}"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.peers_match", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", action="append", help="registered model name (repeatable; default: DeiT-S and the tiny ViT)"
    )
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative GFLOPs gap allowed (default 0.02)")
    parser.add_argument("--check", metavar="SPEC", help="verify a peers spec's matched knobs instead")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_spec(args.check, args.tolerance)
        print("\n".join(problems) or f"{args.check}: every matched run within {100 * args.tolerance:g}% of the target")
        return 1 if problems else 0
    for name in args.model or ["dynamicvit_deit_small_patch16_224", "dynamicvit_tiny_patch8_64"]:
        target, found = matched(name, args.tolerance)
        print(f"{name}: DynamicViT/0.7 = {target:.4f} GFLOPs; matched knobs (tolerance {100 * args.tolerance:g}%):")
        for match in found:
            print("  " + match.line() + ("" if abs(match.gap) <= args.tolerance else "  <- outside the tolerance"))
        print(f"{name}: TokenReduction's keep rates:")
        for rate, method, knob, cost in tr_group(name):
            shown = {k: v for k, v in knob.items() if k != "variant"}
            print(f"  {rate}  {method:11s} {shown}  {cost:.4f} G")
    return 0


if __name__ == "__main__":
    sys.exit(main())
