"""Training-state checkpoints: written atomically, read back to resume exactly.

A checkpoint holds the model, optimiser, scheduler, EMA, the position in training (epoch,
batches done in that epoch, running sums of the epoch's train metrics), every RNG state and
the MLflow run id. It is written to a temporary file in the same folder and renamed over the
previous one, so a kill during the write never destroys the last good checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT = "checkpoint.pth"  # full training state, the resume point
FINAL_WEIGHTS = "model.pth"  # {"model": state_dict}: what teachers and students load


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: the group on a shared cluster must read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint at `path`, or None if there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickled


def weights_file(source: str) -> str:
    """A weights source for `models.load_weights`: a file/URL as is, a run folder -> its final weights.

    Never the folder's resume checkpoint: that is a run still training (or stopped) half-way, and
    a student initialised or distilled from it would look like a result of the finished teacher.
    """
    path = Path(source)
    if path.is_dir():
        if (path / FINAL_WEIGHTS).is_file():
            return str(path / FINAL_WEIGHTS)
        raise FileNotFoundError(f"{source}: no {FINAL_WEIGHTS} in this run folder: its run has not finished "
                                f"(a {CHECKPOINT} is a resume point, never used as weights)")
    return source
