"""Weights in the official layouts: DynamicViT model-zoo checkpoints and DeiT backbones.

A checkpoint is a local file or a URL. A URL is downloaded once into a cache folder (with a
progress bar) and its sha256 is recorded beside the file (`<file>.sha256.json`); every later
use hashes the cached file again and refuses it if it changed. A URL may pin the hash it must
have, pip-style: `https://host/file.pth#sha256=<64 hex digits>`. Offline, or when the cache
cannot be trusted, the error is one line naming the URL, the file and what to do.

Official files keep the weights under "model"; DeiT's published files use the same backbone
keys, so a DeiT checkpoint loads into a DynamicViT with only the predictor keys missing.
`python -m harness.fetch` downloads and verifies ahead of the jobs (e.g. on a login node).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import nn

PREDICTOR_PREFIX = "score_predictor."
RECORD_SUFFIX = ".sha256.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be fetched or trusted, said in one line."""


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $DVIT_CACHE/checkpoints or ~/.cache/dvit-harness/checkpoints."""
    root = os.environ.get("DVIT_CACHE") or Path.home() / ".cache" / "dvit-harness"
    return Path(root) / "checkpoints"


def download_timeout_s() -> float:
    """Seconds to wait for a server to connect or send the next bytes ($DVIT_DOWNLOAD_TIMEOUT, default 60)."""
    return float(os.environ.get("DVIT_DOWNLOAD_TIMEOUT", "60"))


def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def split_pin(source: str) -> tuple[str, Optional[str]]:
    """'URL#sha256=HEX' -> (URL, HEX); a URL without a pin -> (URL, None)."""
    url, _, fragment = str(source).partition("#")
    if not fragment:
        return url, None
    key, _, value = fragment.partition("=")
    value = value.lower()
    if key != "sha256" or not _SHA256.match(value):
        raise CheckpointError(f"checkpoint: {source}: a URL fragment must be #sha256=<64 hex digits>, got #{fragment}")
    return url, value


def cache_name(url: str) -> str:
    """The cached file's name: the URL's file name, or `host-lastpart` when the URL names no file.

    Direct links such as `https://cloud.tsinghua.edu.cn/f/<id>/?dl=1` end in a folder-like id.
    """
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    last = parts[-1] if parts else "index"
    name = last if "." in last.strip(".") else f"{parsed.hostname or 'host'}-{last}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(target: Path) -> Path:
    """The small registry entry beside a cached file: where it came from and its sha256."""
    return target.with_name(target.name + RECORD_SUFFIX)


def read_record(target: Path) -> Optional[dict[str, Any]]:
    path = record_path(target)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path}: unreadable hash record ({err}); delete it and "
                              f"{target.name} to download again") from None
    if not isinstance(record, dict) or not _SHA256.match(str(record.get("sha256", ""))):
        raise CheckpointError(f"checkpoint: {path}: sha256: not a 64-digit hex hash, got {record!r:.80}")
    return record


def _write_record(target: Path, url: str, sha256: str, how: str) -> None:
    record = {"url": url, "sha256": sha256, "bytes": target.stat().st_size, "how": how,
              "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = record_path(target).with_name(f".{record_path(target).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, record_path(target))


def _unreachable(url: str, target: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a download that failed: what, why, and where to put the file by hand."""
    if isinstance(err, urllib.error.HTTPError):
        why = f"the server answered HTTP {err.code} {err.reason}"
    else:
        reason = getattr(err, "reason", None) or err
        why = f"{type(reason).__name__}: {reason}; this machine may be offline"
    return CheckpointError(
        f"checkpoint: could not download {url} ({why}): download it on a machine that is online and "
        f"place it at {target} (or run `python -m harness.fetch {url}` there with the same "
        f"DVIT_CACHE), or pass the local file's path instead of the URL"
    )


def _download(url: str, target: Path, pinned: Optional[str]) -> str:
    """Stream `url` to `target` (hashing as it goes, behind a progress bar); return its sha256.

    Written to a temporary name and renamed only when complete and matching the pin, so an
    interrupted or wrong download never looks like a cached checkpoint.
    """
    from tqdm import tqdm

    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "dvit-harness"})
    try:
        with urllib.request.urlopen(request, timeout=download_timeout_s()) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                      desc=f"download {target.name}", mininterval=1.0) as bar:
                size = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    size += len(chunk)
            if total is not None and size != total:
                raise http.client.IncompleteRead(b"", total - size)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        part.unlink(missing_ok=True)
        raise _unreachable(url, target, err) from None
    actual = digest.hexdigest()
    if pinned is not None and actual != pinned:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint: {url}: sha256 mismatch: expected {pinned} (pinned in the URL), "
                              f"got {actual}; nothing was cached")
    os.replace(part, target)
    _write_record(target, url, actual, "downloaded")
    return actual


def _verify(target: Path, url: str, pinned: Optional[str]) -> str:
    """Hash the cached file and check it against its record (and the pin); record it if unrecorded."""
    actual = sha256_of(target)
    record = read_record(target)
    if record is None:  # placed by hand (the offline route) or cached before hashes were recorded
        if pinned is not None and actual != pinned:
            raise CheckpointError(f"checkpoint: {target}: sha256 mismatch: expected {pinned} (pinned in {url}), "
                                  f"got {actual}")
        _write_record(target, url, actual, "found in the cache")
        print(f"checkpoint: {target}: no hash on record, recorded sha256 {actual} (first use)", file=sys.stderr)
        return actual
    expected = record["sha256"]
    if actual != expected:
        raise CheckpointError(
            f"checkpoint: {target}: sha256 mismatch: expected {expected} (recorded at its first download from "
            f"{record.get('url', '?')}), got {actual}; the file changed or is corrupt: delete it and "
            f"{record_path(target).name} to download it again"
        )
    if pinned is not None and expected != pinned:
        raise CheckpointError(f"checkpoint: {target}: sha256 mismatch: expected {pinned} (pinned in {url}), "
                              f"got {expected} (recorded); delete it and {record_path(target).name} to download again")
    return actual


def fetch(source: str) -> Path:
    """A local path for `source`: a file as is; a URL downloaded once into the cache and verified.

    Several processes fetching the same URL (the ranks of one job) take turns behind a file
    lock, so the file is downloaded once and the others verify the cached copy.
    """
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no such file {path}")
        return path
    from filelock import FileLock  # a dependency of torch

    url, pinned = split_pin(source)
    target = cache_dir() / cache_name(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            _verify(target, url, pinned)
        else:
            _download(url, target, pinned)
    return target


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file/URL, unwrapped from "model"/"state_dict"."""
    path = fetch(source)
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official files also pickle their argparse Namespace: trusted source only
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # e.g. an HTML page saved in place of the file
            raise ValueError(f"checkpoint: {source}: {path} is not a torch checkpoint "
                             f"({type(err).__name__}: {str(err)[:120]})") from None
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
    convert = getattr(model, "checkpoint_filter_fn", None)  # Swin / ConvNeXt: official or timm layout -> the model's
    if convert is not None:
        state = convert(state)
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"checkpoint: {source}: shape mismatch: {'; '.join(mismatched[:5])}")
    result = model.load_state_dict(state, strict=False)
    added = getattr(model, "is_added_key", lambda key: key.startswith(PREDICTOR_PREFIX))  # Swin/ConvNeXt: + fast paths
    missing = [k for k in result.missing_keys if not added(k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint: {source}: missing keys {missing[:8]}, unexpected keys {result.unexpected_keys[:8]}"
        )
    return list(result.missing_keys)

