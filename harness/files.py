"""Files written whole or not at all, with the permissions the user's umask gives.

Every file the project writes for a reader other than the writing process (checkpoints, a run
folder's run.json, the data cache) goes through `write_atomic`: readers never see a partial
file, a kill during the write leaves the previous file, and the one permission policy is the
umask's, as for any file `open()` creates, so that the rest of a group on a shared cluster can
read cache and run files when the umask says so (mkstemp alone would make them 0600).
`PathLike` is the one type of a path argument.

Plain standard library.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Union

PathLike = Union[str, "os.PathLike[str]"]  # what a function that takes a path accepts: a str or a Path


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(handle)` into a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
