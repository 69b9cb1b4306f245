"""The one top-level error handler of every command: one line on stderr, never a traceback for
something the user or the machine got wrong.

- `ConfigError` (bad input: a spec, a config, an argument): its lines, exit 2.
- `EnvironmentProblem` (the machine: a tracking server that does not answer, a full disk): its
  line, exit 1.
- `OSError` and `MemoryError` anywhere below a command (a read-only folder, a full disk, a file
  that vanished): one line naming the path and the cause, exit 2 when the path is the user's to
  fix (permissions, a folder where a file belongs), else 1; the full traceback goes to a log file
  whose path the line ends with.
Anything else is a bug and keeps its traceback.

Plain standard library: a command's error path must not import torch or MLflow.
"""

from __future__ import annotations

import errno
import os
import reprlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# every command's exit codes, defined here only
EXIT_FAILED = 1  # the environment (a server that does not answer, a full disk) or a failed run
EXIT_INVALID = 2  # the user's input (a spec, a config, an argument, a path)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_PREEMPTED = 143  # a run stopped by SIGTERM with its checkpoint written, as a shell reports SIGTERM

# OSErrors the user fixes by naming another path or changing its permissions
_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}


class ConfigError(ValueError):
    """Invalid user input (exit 2): one line per problem, `file: field: problem, got X`."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class EnvironmentProblem(RuntimeError):
    """The environment, not the input, stops the command (exit 1): one line, `where: problem`."""


def show(value: object, limit: int = 120) -> str:
    """A bounded repr: a huge value (a YAML alias bomb) is never expanded into an error message."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxtuple = 3, 6, 6, 6
    short.maxstring = short.maxother = short.maxlong = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_line(err: OSError, folder: Path | None = None) -> tuple[str, int]:
    """`path: problem` and the exit code for an OSError (ENOSPC: the disk is full, exit 1).

    A write through an open file handle names no path: `folder` (the run's) stands in for it.
    """
    where = err.filename or (str(folder) if folder else "(unknown path)")
    problem = {
        errno.ENOSPC: "no space left on the device (disk full)",
        errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded",
    }.get(err.errno or 0, err.strerror or str(err))
    return f"{where}: {problem}", EXIT_INVALID if err.errno in _USER_ERRNOS else EXIT_FAILED


def root_os_error(err: BaseException) -> OSError | None:
    """The OSError behind an exception (torch buries ENOSPC under RuntimeError('unexpected pos ...'))."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _write_log(prog: str, log_dir: Path | None) -> str:
    """The current exception's full traceback in a log file; its path (or why none could be written)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (log_dir, Path(tempfile.gettempdir()) / "dvit-harness"):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{prog.split('.')[-1]}-error-{stamp}-{os.getpid()}.log"
            path.write_text(traceback.format_exc())
            return str(path)
        except OSError:
            continue
    return "no log could be written"


def handle(prog: str, main: Callable[[], int], log_dir: Callable[[], Path | None] = lambda: None) -> int:
    """Run a command's `main`, turning input and environment errors into one line and an exit code.

    `log_dir()` names where a traceback should go (a run's folder); a temporary folder otherwise.
    """
    try:
        return main()
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    except EnvironmentProblem as err:
        print(err, file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `... | head` closed the pipe: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        log = _write_log(prog, log_dir())
        print(f"{prog}: out of memory (sizes too large for this machine?) (traceback: {log})", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # an I/O error anywhere below, possibly wrapped (torch.save on a full disk)
        cause = root_os_error(err)
        if cause is None:
            raise  # a bug: keep the traceback
        line, code = os_error_line(cause, log_dir())
        log = _write_log(prog, log_dir())
        print(f"{line} (traceback: {log})", file=sys.stderr)
        return code
