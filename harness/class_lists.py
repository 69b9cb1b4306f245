"""ImageNet class subsets (`data.classes`): which wnid folders to read and the label of each.

A subset keeps ImageNet-1k's numbering (a wnid's label is its index among the 1000 wnids in
sorted order, as ImageFolder numbers a full train/ folder), so the pretrained 1000-class head
and teacher apply unchanged. Plain Python, no torch: spec validation calls `subset_labels` to
check the class folders before anything is submitted, and harness/data.py builds from it.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

IMAGENET1K_CLASSES = 1000
SHIPPED = {"imagenet100": "imagenet100.txt"}  # data.classes names -> files in harness/data_lists/
WNID = re.compile(r"n\d{8}")


class ClassListError(ValueError):
    """Bad user input, as `data.<field>: problem, got X` (the harness's one-line form)."""


@lru_cache(maxsize=1)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order (position = label), from timm's copy of the list.

    Located through timm's package folder instead of `import timm`, which would import torch.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("timm is not installed: it ships the ImageNet-1k class list")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / "imagenet_synsets.txt"
    wnids = tuple(path.read_text().split())
    if len(wnids) != IMAGENET1K_CLASSES or list(wnids) != sorted(wnids):
        raise RuntimeError(f"{path}: expected the 1000 ImageNet-1k wnids in sorted order, got {len(wnids)}")
    return wnids


def list_file(classes: str) -> Path:
    """The file behind `data.classes`: a shipped list's name, else a path to the user's own file."""
    if classes in SHIPPED:
        return Path(str(resources.files("harness") / "data_lists" / SHIPPED[classes]))
    return Path(classes).expanduser()


def load_class_list(classes: str) -> list[str]:
    """The wnids of `data.classes`, in file order: the first word of each line, `#` starts a comment."""
    path = list_file(classes)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        raise ClassListError(
            f"data.classes: neither a shipped list ({', '.join(SHIPPED)}) nor a readable file of wnids, got {classes!r}"
        ) from None
    index = {wnid: i for i, wnid in enumerate(imagenet1k_wnids())}
    wnids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not WNID.fullmatch(words[0]) or words[0] not in index:
            raise ClassListError(f"data.classes: line {number} of {path} is not an ImageNet-1k wnid, got {words[0]!r}")
        if words[0] in wnids:
            raise ClassListError(f"data.classes: line {number} of {path} repeats a wnid, got {words[0]!r}")
        wnids.append(words[0])
    if not wnids:
        raise ClassListError(f"data.classes: {path} lists no wnids, got {classes!r}")
    return wnids


def subset_labels(classes: str, root: Path) -> dict[str, int]:
    """{wnid: ImageNet-1k label} for `data.classes`, once every class folder is under train/ and val/.

    `root` may be a full ImageNet folder (the other classes are ignored) or hold only the subset.
    """
    wnids = load_class_list(classes)
    for split in ("train", "val"):
        missing = [wnid for wnid in wnids if not (root / split / wnid).is_dir()]
        if missing:
            raise ClassListError(
                f"data.root: no {split}/ folder for class {missing[0]} of data.classes {classes!r} "
                f"({len(missing)} of its {len(wnids)} classes missing), got {str(root / split / missing[0])!r}"
            )
    index = {wnid: i for i, wnid in enumerate(imagenet1k_wnids())}
    return {wnid: index[wnid] for wnid in wnids}
