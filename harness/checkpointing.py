"""A run's training state for resume (`checkpoint.pth`); model weights to load are models/checkpoint.py's.

Training-state checkpoints are written atomically and read back to resume exactly. A finished run
also leaves its final weights (`model.pth`, found by `weights_file`), which models/checkpoint.py loads.

A checkpoint holds the model, optimiser, scheduler, EMA, the position in training (epoch,
batches done in that epoch, running sums of the epoch's train metrics), every RNG state and
the MLflow run id. It is written to a temporary file in the same folder and renamed over the
previous one, so a kill during the write never destroys the last good checkpoint.

It holds only tensors, numbers, strings and plain containers (numpy's RNG state is stored as a
tensor), so it is read back with `torch.load(weights_only=True)` like any other checkpoint: a
file placed in a run folder cannot run code when the run resumes (harness/unpickle.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.files import write_atomic

CHECKPOINT = "checkpoint.pth"  # full training state, the resume point
FINAL_WEIGHTS = "model.pth"  # {"model": state_dict}: what teachers and students load


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` through harness.files.write_atomic: a kill mid-write keeps the last checkpoint."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types weights_only loads: numpy's key array becomes an int64 tensor."""
    legacy: Any = np.random.get_state(legacy=True)  # MT19937's 5-tuple (numpy's stubs say a dict by default)
    name, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]  # a tensor, or a numpy array in checkpoints written before issue 24
    np.random.set_state((name, np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none; a file that would unpickle anything but
    tensors and plain data is refused in one line naming it and the type (UnsafeCheckpoint)."""
    from harness import unpickle

    if not path.is_file():
        return None
    return unpickle.load(path, str(path))


def weights_file(source: str) -> str:
    """A weights source for `models.load_weights`: a file/URL as is, a run folder -> its final weights.

    Never the folder's resume checkpoint: that is a run still training (or stopped) half-way, and
    a student initialised or distilled from it would look like a result of the finished teacher.
    """
    path = Path(source)
    if path.is_dir():
        if (path / FINAL_WEIGHTS).is_file():
            return str(path / FINAL_WEIGHTS)
        raise FileNotFoundError(
            f"{source}: no {FINAL_WEIGHTS} in this run folder: its run has not finished "
            f"(a {CHECKPOINT} is a resume point, never used as weights)"
        )
    return source
