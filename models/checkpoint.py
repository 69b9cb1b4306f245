"""Model weights: download, cache, load; a run's training state for resume is harness/checkpointing.py's.

Weights in the official layouts: DynamicViT model-zoo checkpoints and DeiT backbones.

A checkpoint is a local file or a URL. A URL is downloaded once into a cache folder (with a
progress bar), under a name keyed by the whole URL (two URLs never share a file), and its URL
and sha256 are recorded beside the file (`<file>.sha256.json`) once the download is checked to
be a whole torch checkpoint; every later use hashes the cached file again and refuses it if it
changed or was recorded for another URL. A URL may pin the hash it must have, pip-style:
`https://host/file.pth#sha256=<64 hex digits>`. Offline, or when the cache cannot be trusted,
the error is one line naming the URL, the file and what to do. A cache of verified files is
only read (it may be read-only); the lock is taken only to download or record.

Every file is unpickled with `torch.load(weights_only=True)` (harness/unpickle.py): tensors,
plain containers and the few types official files hold (argparse.Namespace, numpy arrays),
anything else refused in one line naming the file and the type -- never code from a checkpoint.
Official files keep the weights under "model"; DeiT's published files use the same backbone
keys, so a DeiT checkpoint loads into a DynamicViT with only the predictor keys missing.
`python -m harness.fetch` downloads and verifies ahead of the jobs (e.g. on a login node).
"""

from __future__ import annotations

import contextlib
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
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from harness import unpickle
from harness.errors import EnvironmentProblem, os_error_line
from harness.files import write_atomic
from harness.unpickle import UnsafeCheckpoint

PREDICTOR_PREFIX = "score_predictor."
RECORD_SUFFIX = ".sha256.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_EXTENSIONS = (".pth", ".pt", ".tar", ".bin", ".ckpt")  # kept at the end of a cached file's name


class CheckpointError(EnvironmentProblem):
    """A checkpoint that cannot be fetched or trusted, said in one line (the machine or the cache: exit 1)."""


def cache_dir() -> Path:
    """Where downloaded checkpoints live: $DVIT_CACHE/checkpoints or ~/.cache/dvit-harness/checkpoints."""
    root = os.environ.get("DVIT_CACHE") or Path.home() / ".cache" / "dvit-harness"
    return Path(root) / "checkpoints"


def download_timeout_s() -> float:
    """Seconds to wait for a server to connect or send the next bytes ($DVIT_DOWNLOAD_TIMEOUT, default 60)."""
    return float(os.environ.get("DVIT_DOWNLOAD_TIMEOUT", "60"))


def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def split_pin(source: str) -> tuple[str, str | None]:
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
    """The cached file's name: the URL's file name (or `host-lastpart` when it names no file) and a
    hash of the whole URL, `deit_small_patch16_224-cd65a155-<12 hex>.pth`.

    The hash keys the file by the URL, query included: `.../a/model.pth` and `.../b/model.pth`,
    or `uc?id=A` and `uc?id=B`, are different files. Direct links such as
    `https://cloud.tsinghua.edu.cn/f/<id>/?dl=1` end in a folder-like id.
    """
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    last = parts[-1] if parts else "index"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", last if "." in last.strip(".") else f"{parsed.hostname or 'host'}-{last}")
    stem, ext = os.path.splitext(name)
    if ext.lower() not in _EXTENSIONS:
        stem, ext = name, ""
    return f"{stem[:100]}-{hashlib.sha256(url.encode()).hexdigest()[:12]}{ext}"


def cached_path(url: str) -> Path:
    """Where the cache keeps (or would keep) the file of `url` (a pin in the URL does not count)."""
    return cache_dir() / cache_name(split_pin(url)[0])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(target: Path) -> Path:
    """The small registry entry beside a cached file: where it came from and its sha256."""
    return target.with_name(target.name + RECORD_SUFFIX)


def read_record(target: Path) -> dict[str, Any] | None:
    path = record_path(target)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint: {path}: unreadable hash record ({err}); delete it and {target.name} to download again"
        ) from None
    if not isinstance(record, dict) or not _SHA256.match(str(record.get("sha256", ""))):
        raise CheckpointError(f"checkpoint: {path}: sha256: not a 64-digit hex hash, got {record!r:.80}")
    return record


def _write_record(target: Path, url: str, sha256: str, how: str) -> None:
    record = {
        "url": url,
        "sha256": sha256,
        "bytes": target.stat().st_size,
        "how": how,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(record, indent=2) + "\n"
    write_atomic(record_path(target), lambda handle: handle.write(text.encode()))


def _unreachable(url: str, target: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a download that failed: what, why, and where to put the file by hand."""
    if isinstance(err, urllib.error.HTTPError) and err.code in (301, 302, 303, 307, 308):
        why = f"the server redirects in a loop or too often (HTTP {err.code})"  # urllib's reason spans lines
    elif isinstance(err, urllib.error.HTTPError):
        why = f"the server answered HTTP {err.code} {' '.join(str(err.reason).split())}"
    else:
        reason = getattr(err, "reason", None) or err
        why = f"{type(reason).__name__}: {reason}; this machine may be offline"
    return CheckpointError(
        f"checkpoint: could not download {url} ({why}): download it on a machine that is online and "
        f"place it at {target} (or run `python -m harness.fetch {url}` there with the same "
        f"DVIT_CACHE), or pass the local file's path instead of the URL"
    )


class _CacheWrite(Exception):
    """An OSError from writing the download into the cache (a full disk, a read-only or forbidden folder):
    the cache's problem, not the network's."""

    def __init__(self, err: OSError) -> None:
        super().__init__(err)
        self.err = err


def _unwritable(url: str, folder: Path, err: OSError) -> CheckpointError:
    """The one-line error for a download the cache could not take: the folder and the problem."""
    where_problem, _ = os_error_line(OSError(err.errno, err.strerror), folder)  # the folder, not the .part
    return CheckpointError(
        f"checkpoint: {where_problem}: cannot write the download of {url} into the checkpoint cache; free space "
        f"there or point DVIT_CACHE at a writable folder; nothing was cached"
    )


def _download(url: str, target: Path, pinned: str | None) -> str:
    """Stream `url` to `target` (hashing as it goes, behind a progress bar); return its sha256.

    Written to a temporary name and renamed only when complete, a whole torch checkpoint that
    imports nothing but admitted types, and matching the pin, so an interrupted, truncated (a
    server that sends no Content-Length and closes early) or wrong download is never cached.
    """
    from tqdm import tqdm

    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    record_path(target).unlink(missing_ok=True)  # a deleted file's old record: no reader may pair it with the new file
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "dvit-harness"})
    try:
        try:
            out = open(part, "wb")  # closed below, or quietly by `finally` once something failed
        except OSError as err:
            raise _CacheWrite(err) from None
        try:
            with urllib.request.urlopen(request, timeout=download_timeout_s()) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    desc=f"download {Path(urlparse(url).path).name or target.name}",
                    mininterval=1.0,
                ) as bar:
                    size = 0
                    while chunk := response.read(_CHUNK):
                        try:
                            out.write(chunk)
                        except OSError as err:
                            raise _CacheWrite(err) from None
                        digest.update(chunk)
                        bar.update(len(chunk))
                        size += len(chunk)
                if total is not None and size != total:
                    raise http.client.IncompleteRead(b"", total - size)
                try:
                    out.flush()
                except OSError as err:
                    raise _CacheWrite(err) from None
            try:
                out.close()  # a file system that reports a write's failure only at close (NFS)
            except OSError as err:
                raise _CacheWrite(err) from None
        finally:
            if not out.closed:  # a failed write or flush: closing flushes the same bytes again, and its
                with contextlib.suppress(OSError):  # OSError must not replace the error on its way
                    out.close()
        _check_download(part, url, target)
        actual = digest.hexdigest()
        if pinned is not None and actual != pinned:
            raise CheckpointError(
                f"checkpoint: {url}: sha256 mismatch: expected {pinned} (pinned in the URL), "
                f"got {actual}; nothing was cached"
            )
    except _CacheWrite as problem:
        part.unlink(missing_ok=True)
        raise _unwritable(url, target.parent, problem.err) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        part.unlink(missing_ok=True)
        raise _unreachable(url, target, err) from None
    except BaseException:  # a refusal, Ctrl-C or a kill: no partial file is left behind
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    _write_record(target, url, actual, "downloaded")
    return actual


def _check_download(path: Path, url: str, target: Path, placed: bool = False) -> None:
    """A downloaded (or hand-placed) file must be a whole torch checkpoint of admitted types before its hash
    is recorded."""
    problem = unpickle.refusal(path, crc=True)
    if problem is None:
        return
    refused = problem.startswith("refused")  # whole, but it would run code or build unknown objects
    if placed:
        raise (UnsafeCheckpoint if refused else CheckpointError)(
            f"checkpoint: {target}: placed in the cache for {url}, but {problem}; replace it with a good copy"
        )
    if refused:
        raise UnsafeCheckpoint(f"checkpoint: {url}: {problem}; nothing was cached")
    raise CheckpointError(
        f"checkpoint: {url}: the file is {problem}: the download ended early or the server sent "
        f"something else; nothing was cached, try again (or place a good copy at {target})"
    )


def _verify(target: Path, url: str, pinned: str | None, record: dict[str, Any] | None) -> str:
    """Hash the cached file and check it against its record (and the pin); record it if unrecorded."""
    actual = sha256_of(target)
    if record is not None and record.get("url") != url:
        raise CheckpointError(
            f"checkpoint: {target}: recorded as the download of {record.get('url')!r}, not of "
            f"{url}; delete it and {record_path(target).name} to download it again"
        )
    if record is None:  # placed by hand (the offline route) or cached before hashes were recorded
        _check_download(target, url, target, placed=True)
        if pinned is not None and actual != pinned:
            raise CheckpointError(
                f"checkpoint: {target}: sha256 mismatch: expected {pinned} (pinned in {url}), got {actual}"
            )
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
        raise CheckpointError(
            f"checkpoint: {target}: sha256 mismatch: expected {pinned} (pinned in {url}), "
            f"got {expected} (recorded); delete it and {record_path(target).name} to download again"
        )
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
    target = cached_path(url)
    if target.is_file() and (record := read_record(target)) is not None:
        _verify(target, url, pinned, record)  # only reads: a shared read-only cache of verified files works
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as err:
        raise CheckpointError(
            f"checkpoint: {target.parent}: the checkpoint cache cannot be written ({err.strerror}) and holds no "
            f"verified copy of {url}: fetch it into a writable cache (DVIT_CACHE) or pass a local file"
        ) from None
    try:
        if target.is_file():
            _verify(target, url, pinned, read_record(target))
        else:
            _download(url, target, pinned)
    finally:
        lock.release()
    return target


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file/URL, unwrapped from "model"/"state_dict"."""
    path = fetch(source)
    what = f"checkpoint: {source}" + (f" ({path})" if str(path) != str(source) else "")
    try:
        ckpt: Any = unpickle.load(path, what)  # weights_only: official files' args admitted by name
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # e.g. an HTML page saved in place of the file
        line = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise ValueError(f"{what}: not a torch checkpoint ({type(err).__name__}: {line})") from None
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
