"""Weights in the official layouts: DynamicViT model-zoo checkpoints and DeiT backbones.

A checkpoint is a local file or a URL (downloaded once into a cache folder). Official files
keep the weights under "model"; DeiT's published files use the same backbone keys, so a DeiT
checkpoint loads into a DynamicViT with only the predictor keys missing.
"""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

PREDICTOR_PREFIX = "score_predictor."


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $DVIT_CACHE/checkpoints or ~/.cache/dvit-harness."""
    root = os.environ.get("DVIT_CACHE") or Path.home() / ".cache" / "dvit-harness"
    return Path(root) / "checkpoints"


def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def fetch(source: str) -> Path:
    """A local path for `source`; URLs are downloaded once and cached."""
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no such file {path}")
        return path
    target = cache_dir() / Path(urlparse(source).path).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(source, str(target), progress=False)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"checkpoint: could not download {source} ({err}). This machine may be offline: "
            f"download the file elsewhere and pass its local path, or place it at {target}"
        ) from err
    return target


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file/URL, unwrapped from "model"/"state_dict"."""
    path = fetch(source)
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official files also pickle their argparse Namespace: trusted source only
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint: {source} holds no state dict (got {type(ckpt).__name__})")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(model: nn.Module, source: str) -> list[str]:
    """Load official DynamicViT or DeiT weights; return the missing keys (predictors only).

    Anything else missing, any unexpected key or any shape mismatch is an error naming it.
    """
    state = read_state_dict(source)
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"checkpoint: {source}: shape mismatch: {'; '.join(mismatched[:5])}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(PREDICTOR_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint: {source}: missing keys {missing[:8]}, unexpected keys {result.unexpected_keys[:8]}"
        )
    return list(result.missing_keys)
