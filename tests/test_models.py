"""The DynamicViT family through its public entry points: timm's factory and the checkpoint loader."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import timm
import torch

import models
from harness.catalog import MODEL_DEFAULTS, VARIANTS
from harness.measure import count_gflops

MICRO = "dynamicvit_micro_patch4_32"
DEIT_S = "dynamicvit_deit_small_patch16_224"


def micro(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(MICRO, **kwargs)


def images(model, batch: int = 4) -> torch.Tensor:
    chans = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    return torch.randn(batch, chans, height, width, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(n for n, s in MODEL_DEFAULTS.items() if s.get("_family", "deit") == "deit"))
def test_every_registered_model_trains_and_infers(name: str) -> None:
    assert name in timm.list_models("dynamicvit_*")
    model = timm.create_model(name, keep_ratio=0.7)
    x = images(model, batch=2)
    model.train()
    out = model(x)
    assert isinstance(out, models.DynamicViTOutput)
    assert out.logits.shape == (2, model.num_classes)
    assert out.tokens.shape == (2, model.num_patches, model.embed_dim)
    assert out.decision.shape == (2, model.num_patches)
    assert out.keep_fractions.shape == (2, 3)
    (out.logits.sum() + out.tokens.mean() + out.keep_fractions.sum()).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("score_predictor.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "the predictor must get a gradient through the policy"
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, model.num_classes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_infers(variant: str) -> None:
    model = micro(variant=variant, keep_ratio=0.6)
    x = images(model)
    out = model.train()(x)
    expected_tokens = model.num_patches // 4 if variant == "structural" else model.num_patches
    assert out.logits.shape == (4, 10)
    assert out.tokens.shape == (4, expected_tokens, model.embed_dim)
    stages = 3 if variant in ("dynamic", "static", "random", "attention") else 0
    assert out.keep_fractions.shape == (4, stages)
    loss = out.logits.logsumexp(-1).mean() + out.tokens.pow(2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert model.eval()(x).shape == (4, 10)


def test_dense_variant_is_the_timm_vit() -> None:
    """`dense` computes exactly what timm's plain ViT computes with the same weights."""
    model = micro(variant="dense").eval()
    plain = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=4,
        in_chans=3,
        num_classes=10,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=2.0,
        qkv_bias=True,
    ).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_masked(x).logits, plain(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------- checkpoint layout
def official_keys(depth: int = 12, stages: int = 3) -> set[str]:
    """The key set of an official DynamicViT-DeiT checkpoint (shared/reference/dynamicvit.md)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for wb in ("weight", "bias"):
        keys |= {f"norm.{wb}", f"head.{wb}"}
        for b in range(depth):
            for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                keys.add(f"blocks.{b}.{part}.{wb}")
        for s in range(stages):
            for part in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4"):
                keys.add(f"score_predictor.{s}.{part}.{wb}")
    return keys


def test_parameter_names_match_the_official_checkpoint() -> None:
    model = timm.create_model(DEIT_S)
    state = model.state_dict()
    assert set(state) == official_keys()
    assert state["pos_embed"].shape == (1, 197, 384)
    assert model.score_predictor[0].in_conv[0].eps == 1e-5  # predictor LayerNorm
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


def test_official_checkpoint_round_trip_strict(tmp_path: Path) -> None:
    source = timm.create_model(DEIT_S)
    path = tmp_path / "dynamicvit_s_0.7.pth"
    torch.save({"model": source.state_dict(), "epoch": 29}, path)

    ckpt = torch.load(path, map_location="cpu")
    target = timm.create_model(DEIT_S)
    target.load_state_dict(ckpt["model"], strict=True)  # what users do with the model zoo
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    by_factory = timm.create_model(DEIT_S, checkpoint=str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(by_factory.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_deit_backbone_weights_load_with_only_predictors_missing(tmp_path: Path) -> None:
    deit = timm.create_model("deit_small_patch16_224")
    path = tmp_path / "deit_small_patch16_224.pth"
    torch.save({"model": deit.state_dict()}, path)
    model = timm.create_model(DEIT_S)
    missing = models.load_weights(model, str(path))
    assert missing and all(k.startswith("score_predictor.") for k in missing)
    assert set(missing) == {k for k in official_keys() if k.startswith("score_predictor.")}
    assert torch.equal(model.blocks[5].mlp.fc1.weight, deit.blocks[5].mlp.fc1.weight)
    dense = timm.create_model(DEIT_S, variant="dense", checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), deit.eval()(x), rtol=0, atol=1e-5)


def test_checkpoint_with_wrong_keys_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="missing keys"):
        models.load_weights(micro(), str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        models.load_weights(micro(), str(tmp_path / "absent.pth"))


def test_checkpoint_url_is_cached_and_offline_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DVIT_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/zoo/micro.pth"  # discard port: nothing answers, as offline
    with pytest.raises(RuntimeError, match=r"could not download .*offline"):
        models.load_weights(micro(), url)
    source = micro()
    from models.checkpoint import cached_path

    cached = cached_path(url)  # the cache's name for this URL (keyed by the whole URL)
    assert cached.parent == tmp_path / "checkpoints"
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": source.state_dict()}, cached)
    target = timm.create_model(MICRO, checkpoint=url)  # served from the cache, no network
    assert torch.equal(target.head.weight, source.head.weight)


# ------------------------------------------------------------------- dropping == masking
@pytest.mark.parametrize("variant", ["dynamic", "static", "attention"])
@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_dropping_tokens_equals_masking_them(variant: str, ratio: float) -> None:
    model = micro(variant=variant, keep_ratio=ratio).eval()
    if variant == "dynamic":  # the official init (std 0.02) leaves the keep scores nearly tied, and float
        with torch.no_grad():  # rounding would pick among ties: spread them, as a trained predictor's are
            for predictor in model.score_predictor:
                predictor.out_conv[4].weight.normal_(std=1.0)
    x = images(model, batch=8)
    with torch.no_grad():
        masked = model.forward_masked(x, deterministic=True)
        gathered, kept = model.forward_pruned(x, return_positions=True)
    torch.testing.assert_close(gathered, masked.logits, rtol=0, atol=1e-4)
    # and the same tokens survive: the final masked decision marks the last stage's gathered set
    last = torch.zeros_like(masked.decision).scatter_(1, kept[-1], 1.0)
    assert torch.equal(last, masked.decision)


@pytest.mark.parametrize("variant", ["random", "attention"])
def test_random_and_attention_train_on_gathered_tokens_as_if_masked(variant: str) -> None:
    """Their training path gathers (pruned cost) yet gives the masked path's outputs and gradients."""
    model = micro(variant=variant, keep_ratio=0.7).train()
    x = images(model, batch=8)

    def loss_and_grads(forward):
        torch.manual_seed(3)  # the same random draws for both paths
        out = forward(x)
        model.zero_grad()
        kept = out.decision[..., None]
        (out.logits.square().sum() + (out.tokens * kept).square().sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masked, masked_grads = loss_and_grads(model.forward_masked)
    gathered, gathered_grads = loss_and_grads(model)
    assert torch.equal(gathered.decision, masked.decision)
    assert gathered.decision.sum(dim=1).eq(model.num_keep[-1]).all()
    torch.testing.assert_close(gathered.keep_fractions, masked.keep_fractions)
    torch.testing.assert_close(gathered.logits, masked.logits, rtol=0, atol=1e-4)
    kept = masked.decision[..., None]
    torch.testing.assert_close(gathered.tokens, masked.tokens * kept, rtol=0, atol=1e-4)
    assert gathered_grads.keys() == masked_grads.keys()
    for name, grad in masked_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_deterministic_mode_is_the_default_training_path_when_set() -> None:
    model = micro(deterministic=True).train()
    x = images(model)
    first, second = model(x), model(x)
    assert torch.equal(first.decision, second.decision)
    gumbel = micro().train()
    decisions = {tuple(gumbel(x).decision.flatten().tolist()) for _ in range(3)}
    assert len(decisions) > 1, "Gumbel sampling must vary between passes"


# --------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("ratio, paper", [(1.0, 4.6), (0.9, 4.0), (0.8, 3.4)])
def test_deit_s_flops_match_the_paper(ratio: float, paper: float) -> None:
    assert count_gflops(timm.create_model(DEIT_S, keep_ratio=ratio)) == pytest.approx(paper, abs=0.05)


def test_deit_s_07_flops_backbone_matches_paper_and_predictors_are_counted() -> None:
    """DynamicViT-S/0.7: the backbone counts the paper's 2.9 G; the three predictors add 0.087 G
    on top (the paper's table does not count them; we report what inference really runs)."""
    dynamic = count_gflops(timm.create_model(DEIT_S, keep_ratio=0.7))
    backbone = count_gflops(timm.create_model(DEIT_S, keep_ratio=0.7, variant="random"))
    assert backbone == pytest.approx(2.9, abs=0.05)
    assert dynamic - backbone == pytest.approx(0.087, abs=0.002)
    assert count_gflops(timm.create_model("deit_small_patch16_224")) == pytest.approx(4.6, abs=0.01)


def test_the_papers_gflops_column_is_fvcore_truncated_to_one_decimal() -> None:
    """Where 2.9 comes from: fvcore's count (its matmuls equal ours; it adds layer norms) cut,
    not rounded, to one decimal gives the paper's 4.6 / 4.0 / 3.4 / 2.9 at every keep ratio,
    predictors included (rounding would give 3.5 and 3.0)."""
    from fvcore.nn import FlopCountAnalysis

    for ratio, paper in [(1.0, 4.6), (0.9, 4.0), (0.8, 3.4), (0.7, 2.9)]:
        model = timm.create_model(DEIT_S, keep_ratio=ratio).eval()
        for block in model.blocks:
            block.attn.fused_attn = False  # fvcore cannot see inside fused attention
        analysis = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
        matmuls = (by_op["linear"] + by_op["matmul"] + by_op["conv"]) / 1e9
        assert matmuls == pytest.approx(count_gflops(timm.create_model(DEIT_S, keep_ratio=ratio)), abs=1e-3)
        assert math.floor(analysis.total() / 1e8) / 10 == paper, (ratio, analysis.total() / 1e9)


def test_kept_token_counts_per_stage() -> None:
    model = timm.create_model(DEIT_S, keep_ratio=0.7).eval()
    assert model.num_keep == [137, 96, 67]
    with torch.no_grad():
        _, kept = model.forward_pruned(torch.randn(2, 3, 224, 224), return_positions=True)
    assert [k.shape for k in kept] == [(2, 137), (2, 96), (2, 67)]
    for earlier, later in itertools.pairwise(kept):  # every stage keeps a subset of the previous one
        for row in range(2):
            assert set(later[row].tolist()) <= set(earlier[row].tolist())
    custom = micro(pruning_loc=[2], stage_ratios=[0.25])
    assert custom.num_keep == [16]


def test_training_keep_fractions_follow_the_decisions() -> None:
    model = micro(keep_ratio=0.5, deterministic=True).train()
    out = model(images(model))
    torch.testing.assert_close(out.keep_fractions, torch.tensor([[0.5, 0.25, 0.125]]).expand(4, 3))


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_no_nan_at_keep_ratio_01(variant: str) -> None:
    model = micro(variant=variant, keep_ratio=0.1)  # keeps 6, 0, 0 of 64 tokens
    assert model.num_keep == [6, 0, 0]
    x = images(model)
    for deterministic in (False, True):
        out = model.train().forward_masked(x, deterministic=deterministic)
        for tensor in (out.logits, out.tokens, out.keep_fractions):
            assert torch.isfinite(tensor).all()
        (out.logits.sum() + out.keep_fractions.sum() + out.tokens.sum()).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(keep_ratio=0.0), "keep_ratio: must be in \\(0, 1\\]"),
        (dict(keep_ratio=1.5), "keep_ratio: must be in \\(0, 1\\], got 1.5"),
        (dict(variant="magic"), "variant: must be one of dense, dynamic"),
        (dict(pruning_loc=[1, 4]), "pruning_loc: each location must be a block index in \\[0, 3\\]"),
        (dict(pruning_loc=[2, 1]), "pruning_loc: must be strictly increasing"),
        (dict(pruning_loc=[1, 2], stage_ratios=[0.5]), "stage_ratios: need one ratio per pruning location"),
        (dict(img_size=30), "img_size: must be a multiple of patch_size 4"),
        (dict(variant="structural", pool_after_block=4), "pool_after_block: must be a block count in \\[1, 3\\]"),
        (dict(variant="attention", pruning_loc=[0, 2]), "pruning_loc: the attention variant"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        timm.create_model(MICRO, **kwargs)


def test_wrong_input_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="input: expected images of size \\(32, 32\\)"):
        micro().eval()(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------- masked attention (fast path)
def reference_masked_attention(q, k, v, policy, scale, eps=1e-6):
    """The official formula, written out plainly (in the inputs' dtype, so float64 stays float64):
    exp of row-max-shifted logits times (policy + (1 - policy) * I), then (attn + eps/N) / (sum + eps)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    batch, _, tokens, _ = attn.shape
    keep = policy.reshape(batch, 1, 1, tokens)
    eye = torch.eye(tokens, dtype=attn.dtype).view(1, 1, tokens, tokens)
    attn_policy = keep + (1.0 - keep) * eye
    attn = (attn - attn.amax(dim=-1, keepdim=True)).exp() * attn_policy
    attn = (attn + eps / tokens) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn @ v


def attention_case(case: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v (B, H, N, d) and a policy (B, N) with CLS kept, for one regime of the formula."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, tokens, dim = 3, 2, 11, 5
    sharpness = 15.0 if case == "sharp" else 1.0  # sharp: kept rows whose mass is ~eps (S ~ eps)
    q = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype) * sharpness
    k = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype)
    policy = (torch.rand(batch, tokens, generator=gen, dtype=dtype) > 0.5).to(dtype)
    if case == "all_dropped":
        policy[1] = 0.0
    policy[:, 0] = 1.0
    if case == "soft":  # a non-binary policy, as a straight-through estimator can produce
        policy = torch.rand(batch, tokens, generator=gen, dtype=dtype)
    return q, k, v, policy


def value_and_grads(fn, q, k, v, policy, scale):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, policy)]
    out = fn(*leaves, scale)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * weight.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("case", ["binary", "sharp", "all_dropped", "soft"])
def test_masked_attention_matches_the_formula_values_and_gradients(case: str) -> None:
    """The fast masked attention equals the official formula: output and the gradients with
    respect to q, k, v and the policy, to float64 rounding (the max's gradient included)."""
    q, k, v, policy = attention_case(case, torch.float64)
    expected = value_and_grads(reference_masked_attention, q, k, v, policy, 0.37)
    got = value_and_grads(models.masked_attention.masked_attention, q, k, v, policy, 0.37)
    for name, want, have in zip(["out", "dq", "dk", "dv", "dpolicy"], expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["binary", "sharp"])
def test_masked_attention_fp32_is_within_float_rounding(case: str) -> None:
    """fp32 (the training dtype): the output within 1e-6 of the fp32 reference (`masked_softmax`),
    and the output and every gradient as close to the exact (float64) formula as that reference is."""
    q, k, v, policy = attention_case(case, torch.float64, seed=1)
    exact = value_and_grads(reference_masked_attention, q, k, v, policy, 0.37)
    args32 = [t.float() for t in (q, k, v, policy)]
    fast = value_and_grads(models.masked_attention.masked_attention, *args32, 0.37)
    ref32 = value_and_grads(
        lambda q, k, v, p, s: models.masked_attention.masked_softmax((q * s) @ k.transpose(-2, -1), p) @ v,
        *args32,
        0.37,
    )
    torch.testing.assert_close(fast[0], ref32[0], rtol=0, atol=1e-6)
    for name, want, have, ref in zip(["out", "dq", "dk", "dv", "dpolicy"], exact, fast, ref32, strict=True):
        ref_err = (ref.double() - want).abs().max().item()
        err = (have.double() - want).abs().max().item()
        assert err <= max(4 * ref_err, 1e-6 * want.abs().max().item()), (name, err, ref_err)


def test_masked_attention_gradcheck() -> None:
    q, k, v, policy = attention_case("binary", torch.float64, seed=2)
    small = [t[:2, :, :6, :3].clone() if t.ndim == 4 else t[:2, :6].clone() for t in (q, k, v, policy)]
    leaves = [t.requires_grad_() for t in small]
    assert torch.autograd.gradcheck(
        lambda *a: models.masked_attention.masked_attention(*a, 0.5), leaves, eps=1e-6, atol=1e-6
    )


def test_fused_and_reference_masked_paths_train_alike() -> None:
    """The whole masked training forward/backward: fast path == reference masked softmax path
    (logits, final tokens and every parameter gradient, predictors included)."""
    results = []
    for fused in (True, False):
        model = micro(keep_ratio=0.6, deterministic=True).train()
        for module in model.modules():
            if isinstance(module, models.masked_attention.MaskedAttention):
                module.fused_masked_attn = fused
        out = model(images(model))
        (out.logits.logsumexp(-1).mean() + out.tokens.pow(2).mean() + out.keep_fractions.sum()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.tokens, ref.tokens, rtol=0, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys()
    assert any(n.startswith("score_predictor.") and g.abs().sum() > 0 for n, g in fast_grads.items())
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)
