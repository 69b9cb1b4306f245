"""What a checkpoint may unpickle: tensors, plain containers and a few named types; nothing else.

Unpickling a file can run any code its author chose (`__reduce__` -> `os.system`), so every
checkpoint -- official weights, a teacher, the project's own resume points -- is loaded with
`torch.load(weights_only=True)`, and the few objects beyond tensors that real checkpoints hold
are admitted by name through torch's safe-globals mechanism (`ADMITTED`).

`imported_globals` lists the globals a file's pickle imports by reading its opcodes
(`pickletools`), without unpickling anything, so that the launcher (standard library only: no
torch) refuses such a file before a job is submitted, and every refusal names the type.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

# Objects beyond tensors that real checkpoints hold, by the name their pickles use.
ADMITTED = (
    "argparse.Namespace",  # the official DynamicViT / DeiT / LV-ViT (timm) scripts save their `args`
    # numpy arrays and scalars: the RNG state in the project's checkpoints written before issue 24,
    # numbers in official files (timm's `metric`); numpy 1.x pickles name numpy.core, 2.x numpy._core
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)
# numpy >= 2 builds a dtype through its class: the numeric ones (never object, string or void)
_NUMPY_DTYPES = (
    "Bool",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float16",
    "Float32",
    "Float64",
    "Complex64",
    "Complex128",
)

# torch's own weights_only allowlist (torch._weights_only_unpickler._get_allowed_globals), as patterns
_TORCH_ALLOWED = re.compile(
    r"(torch|torch\.cuda|torch\.sparse|torch\.cuda\.sparse)\.[A-Z][A-Za-z0-9]*(Storage|Tensor)"
    r"|torch\.(u?int\d+|q?u?int\d+(x\d+)?|float\d+(_[a-z0-9]+)*|bfloat16|bool|b?complex\d+|bits\w+"
    r"|per_(tensor|channel)_\w+|Size|Tensor|device)"
    r"|torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_from_type_v2|torch\.serialization\._get_layout"
    r"|torch\.nn\.parameter\.Parameter|torch\.storage\.(Typed|Untyped)Storage"
    r"|collections\.(OrderedDict|Counter)|builtins\.(set|bytearray|complex)|_codecs\.encode"
)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP", "MARK", "POP", "POP_MARK"}
LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys
SAFE_TYPES = "tensors, plain containers, argparse.Namespace and numpy arrays"


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose pickle would import a type that is not admitted (the user's file: exit 2)."""


def allowed(name: str) -> bool:
    """Whether torch.load(weights_only=True) with the ADMITTED globals would import `name`."""
    return name in ADMITTED or bool(_TORCH_ALLOWED.fullmatch(name))


def _scan(stream: BinaryIO) -> list[str]:
    """The globals one pickle imports; '?' for one computed at unpickling time (never admitted)."""
    found: list[str] = []
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # the values pushed so far, as strings where they are strings
    arg: Any  # typeshed says `Any | None`; each opcode below has an argument of its own type
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            owner, member = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.append(f"{owner}.{member}" if owner is not None and member is not None else "?")
            pushed.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(f"?copyreg extension {arg}")
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(str(arg) if not isinstance(arg, bytes) else arg.decode("latin-1"))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name not in _NO_PUSH_OPS:
            pushed.append(None)
    return found


def imported_globals(path: Path, crc: bool = False) -> list[str]:
    """Every `module.name` a torch checkpoint's pickles import, read without unpickling them.

    Raises ValueError (one line, no path) for a file that is not a whole torch checkpoint; `crc`
    also checks every member of a zip checkpoint (it reads the whole file: for fresh downloads).
    """
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK":  # torch's zip format: <archive>/data.pkl holds the object, tensors stored beside it
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pickles) != 1:
                    raise ValueError(f"not a torch checkpoint (a zip archive with {len(pickles)} data.pkl, not one)")
                if crc and (bad := archive.testzip()) is not None:
                    raise ValueError(f"a truncated or damaged checkpoint ({bad} fails its CRC check)")
                data = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise ValueError(f"a truncated or damaged checkpoint (not a valid zip archive: {err})") from None
        streams: list[BinaryIO] = [io.BytesIO(data)]
        count = 1
    elif head[:1] == b"\x80":  # torch's legacy format: several pickles in a row, then raw storage bytes
        streams, count = [open(path, "rb")], LEGACY_PICKLES
    else:
        raise ValueError("not a torch checkpoint (neither a zip archive nor a pickle)")
    found: list[str] = []
    try:
        for _ in range(count):
            found += _scan(streams[0])
    except (ValueError, EOFError, IndexError, KeyError) as err:
        raise ValueError(f"a truncated or damaged checkpoint (its pickle cannot be read: {err})") from None
    finally:
        streams[0].close()
    return found


def refused_globals(path: Path, crc: bool = False) -> list[str]:
    """The globals `path` would import that are not admitted (ValueError: not a whole torch checkpoint)."""
    return list(dict.fromkeys(name for name in imported_globals(path, crc) if not allowed(name)))


def refused_line(names: list[str]) -> str:
    return (
        f"refused: unpickling it would import {', '.join(names[:3])}{' and more' if len(names) > 3 else ''} "
        f"(a checkpoint may hold only {SAFE_TYPES})"
    )


def refusal(path: Path, crc: bool = False) -> str | None:
    """Why `path` must not be unpickled (a type not admitted, a damaged file), or None."""
    try:
        refused = refused_globals(path, crc)
    except ValueError as err:
        return str(err)
    return refused_line(refused) if refused else None


def _admitted_objects() -> list[Any]:
    """ADMITTED as objects for torch.serialization.safe_globals, under the names the pickles use."""
    import argparse
    import importlib

    import numpy as np

    core = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    objects: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    for where in ("numpy.core.multiarray", "numpy._core.multiarray"):
        objects += [(core._reconstruct, f"{where}._reconstruct"), (core.scalar, f"{where}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    objects += [getattr(dtypes, f"{n}DType") for n in _NUMPY_DTYPES if hasattr(dtypes, f"{n}DType")]
    return objects


def load(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) with the ADMITTED types; anything else refused in one line.

    `what` names the file in the message (a URL and its cached file, or a run's checkpoint).
    """
    import pickle

    import torch

    problem = refusal(path)
    if problem:
        raise (UnsafeCheckpoint if problem.startswith("refused") else ValueError)(f"{what}: {problem}")
    try:
        with torch.serialization.safe_globals(_admitted_objects()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's own check, behind ours: its message spans lines
        named = re.findall(r"GLOBAL (\S+)|got <class '([^']+)'>", str(err))
        types = ", ".join(a or b for a, b in named) or "a type or opcode torch does not load"
        raise UnsafeCheckpoint(
            f"{what}: refused by torch.load(weights_only=True): it would import {types} "
            f"(a checkpoint may hold only {SAFE_TYPES})"
        ) from None
