"""The registered DynamicViT models as plain data (no torch), shared by the model factory
(models/: each family module registers its names with timm through models/registry.py) and spec
validation (which must answer without importing torch)."""

from __future__ import annotations

from typing import Any, Literal, get_args

# the variant names, once: the config's `model.variant` type and the tuples the models check against
OwnVariant = Literal["dense", "dynamic", "static", "structural", "random", "attention"]  # models/dynamic_vit.py
PeerVariant = Literal["evit", "topk", "tome"]  # peer token-reduction methods (models/peers.py)
Variant = Literal[OwnVariant, PeerVariant]
PEER_VARIANTS: tuple[str, ...] = get_args(PeerVariant)
VARIANTS: tuple[str, ...] = get_args(Variant)


def _deit(embed_dim: int, heads: int, url: str | None = None) -> dict[str, Any]:
    return dict(
        img_size=224,
        patch_size=16,
        embed_dim=embed_dim,
        depth=12,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        pruning_loc=(3, 6, 9),
        _url=url,
    )


_DEIT_URLS = {  # the published DeiT weights (backbone only): `pretrained=True` loads them
    "small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # DeiT-256 (DynamicViT's own small DeiT: embed 256, 4 heads); no public DeiT weights
    "dynamicvit_deit_256_patch16_224": _deit(256, 4),
    "dynamicvit_deit_small_patch16_224": _deit(384, 6, _DEIT_URLS["small"]),
    "dynamicvit_deit_base_patch16_224": _deit(768, 12, _DEIT_URLS["base"]),
    # The tiny (CPU proxy) scale: 64 px canvas, 8x8 patches -> 64 tokens (shared/reference/proxy.md)
    "dynamicvit_tiny_patch8_64": dict(
        img_size=64,
        patch_size=8,
        in_chans=1,
        num_classes=10,
        embed_dim=96,
        depth=8,
        num_heads=3,
        mlp_ratio=4.0,
        qkv_bias=True,
        pruning_loc=(2, 4, 6),
    ),
    # For tests: 32 px, 4x4 patches -> 64 tokens, a few thousand parameters per block
    "dynamicvit_micro_patch4_32": dict(
        img_size=32,
        patch_size=4,
        in_chans=3,
        num_classes=10,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=2.0,
        qkv_bias=True,
        pruning_loc=(1, 2, 3),
    ),
}


# LV-ViT (models/lvvit.py; `_family` keeps models/dynamic_vit.py from registering them): the
# 2021 script's models (main_dynamic_vit.py:315-322, 341-348: depth 16 / 20, mlp_ratio 3,
# qkv_bias False, skip_lam 2, "4_2" stem, pruning before blocks [4, 8, 12] / [5, 10, 15]).
# `_url`: TokenLabeling's dense weights, the ones the official README links (HEAD README.md:87-88).
_TOKEN_LABELING = "https://github.com/zihangJiang/TokenLabeling/releases/download/1.0"


def _lvvit(embed_dim: int, depth: int, heads: int, pruning_loc: tuple[int, ...], url: str) -> dict[str, Any]:
    return dict(
        img_size=224,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=3.0,
        qkv_bias=False,
        skip_lam=2.0,
        stem_chs=64,
        pruning_loc=pruning_loc,
        _url=url,
        _family="lvvit",
    )


MODEL_DEFAULTS.update(
    {
        "dynamicvit_lvvit_small_patch16_224": _lvvit(
            384, 16, 6, (4, 8, 12), f"{_TOKEN_LABELING}/lvvit_s-26M-224-83.3.pth.tar"
        ),
        "dynamicvit_lvvit_medium_patch16_224": _lvvit(
            512, 20, 8, (5, 10, 15), f"{_TOKEN_LABELING}/lvvit_m-56M-224-84.0.pth.tar"
        ),
        # The tiny (CPU proxy) scale's LV-ViT (not TokenLabeling's 224 px LV-ViT-T): the tiny ViT's
        # canvas and tokens with LV-ViT's stem (16 channels), skip_lam, mlp_ratio 3 and aux head.
        "dynamicvit_lvvit_tiny_patch8_64": dict(
            img_size=64,
            patch_size=8,
            in_chans=1,
            num_classes=10,
            embed_dim=64,
            depth=8,
            num_heads=2,
            mlp_ratio=3.0,
            qkv_bias=False,
            skip_lam=2.0,
            stem_chs=16,
            pruning_loc=(2, 4, 6),
            _family="lvvit",
        ),
    }
)


# DynamicSwin and DynamicCNN (models/swin.py, models/convnext.py): the T-PAMI dynamic spatial
# sparsification of the third stage, on timm's Swin / ConvNeXt (keyword arguments are timm's).
# Kept apart from MODEL_DEFAULTS (the ViT families): `pruning_loc` indexes the third stage's blocks.
# Locations as HEAD main.py builds them (:278-307 ConvNeXt, :358-405 Swin); `_url`: the dense
# backbones the official README links (HEAD README.md:89-91), loaded by `pretrained=True`.
_SWIN_URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
_CONVNEXT_URL = "https://dl.fbaipublicfiles.com/convnext"


def _swin(
    embed_dim: int,
    depths: tuple[int, ...],
    heads: tuple[int, ...],
    pruning_loc: tuple[int, ...],
    url: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    spec = dict(
        img_size=224,
        patch_size=4,
        window_size=7,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        drop_path_rate=0.0,
        pruning_loc=pruning_loc,
        _url=url,
        _family="swin",
    )
    return {**spec, **overrides}


def _convnext(
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    pruning_loc: tuple[int, ...],
    url: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    spec = dict(
        img_size=224,
        patch_size=4,
        depths=depths,
        dims=dims,
        drop_path_rate=0.0,
        pruning_loc=pruning_loc,
        _url=url,
        _family="convnext",
    )
    return {**spec, **overrides}


SPATIAL_MODELS: dict[str, dict[str, Any]] = {
    "dynamicswin_tiny_patch4_window7_224": _swin(
        96, (2, 2, 6, 2), (3, 6, 12, 24), (1, 2, 3), f"{_SWIN_URL}/swin_tiny_patch4_window7_224.pth"
    ),
    "dynamicswin_small_patch4_window7_224": _swin(
        96, (2, 2, 18, 2), (3, 6, 12, 24), (2, 4, 6), f"{_SWIN_URL}/swin_small_patch4_window7_224.pth"
    ),
    "dynamicswin_base_patch4_window7_224": _swin(
        128, (2, 2, 18, 2), (4, 8, 16, 32), (2, 4, 6), f"{_SWIN_URL}/swin_base_patch4_window7_224.pth"
    ),
    "dynamicconvnext_tiny": _convnext(
        (3, 3, 9, 3), (96, 192, 384, 768), (1, 2, 3), f"{_CONVNEXT_URL}/convnext_tiny_1k_224_ema.pth"
    ),
    "dynamicconvnext_small": _convnext(
        (3, 3, 27, 3), (96, 192, 384, 768), (3, 6, 9), f"{_CONVNEXT_URL}/convnext_small_1k_224_ema.pth"
    ),
    "dynamicconvnext_base": _convnext(
        (3, 3, 27, 3), (128, 256, 512, 1024), (3, 6, 9), f"{_CONVNEXT_URL}/convnext_base_1k_224_ema.pth"
    ),
    # The tiny (CPU proxy) scale, 64 px cluttered MNIST; one dense third-stage block, then the 3
    # locations. Swin: 2x2 patches, third stage 8 x 8 = 64 positions (the tiny ViT's 64 tokens).
    # ConvNeXt: timm's "overlap_act" stem (two 3x3 stride-2 convolutions), third stage 4 x 4 = 16
    # positions, layer scales starting at 1 (not 1e-6). Trained from scratch on the proxy, 1x1
    # patches (a 16 x 16 third stage; timm's ConvNeXt adds a stride to its first stage after a
    # 2-pixel stem, so 8 x 8 is out of reach from 64 px) stayed at chance for 6-8 epochs with
    # either layer-scale init, and 4x4 patches for 3; this stem started to learn.
    "dynamicswin_proxy_patch2_window4_64": _swin(
        16, (1, 1, 4, 1), (1, 1, 2, 4), (1, 2, 3), img_size=64, patch_size=2, window_size=4, in_chans=1, num_classes=10
    ),
    "dynamicconvnext_proxy_64": _convnext(
        (1, 1, 4, 1),
        (24, 48, 96, 192),
        (1, 2, 3),
        img_size=64,
        in_chans=1,
        num_classes=10,
        stem_type="overlap_act",
        ls_init_value=1.0,
    ),
    # For tests: 32 px, 1x1 patches, third stage 8 x 8 = 64 positions, a few thousand parameters per block
    "dynamicswin_micro_patch1_window4_32": _swin(
        16, (1, 1, 4, 1), (1, 1, 2, 4), (1, 2, 3), img_size=32, patch_size=1, window_size=4, num_classes=10
    ),
    "dynamicconvnext_micro_patch1_32": _convnext(
        (1, 1, 4, 1), (8, 16, 32, 64), (1, 2, 3), img_size=32, patch_size=1, num_classes=10
    ),
}
ALL_MODELS: dict[str, dict[str, Any]] = {**MODEL_DEFAULTS, **SPATIAL_MODELS}
SPATIAL_VARIANTS = ("dense", "dynamic")


def family(name: str) -> str:
    """`deit`, `lvvit`, `swin` or `convnext`: which model module builds `name`."""
    return ALL_MODELS[name].get("_family", "deit")


def pruning_depth(name: str) -> int:
    """How many blocks `pruning_loc` indexes: the ViT's depth, or the sparsified third stage's."""
    spec = ALL_MODELS[name]
    return spec["depths"][2] if name in SPATIAL_MODELS else spec["depth"]
