"""The DeiT family's timm entry points: every catalog name whose `_family` is "deit".

One entry point builds any variant on the DeiT backbone: the plain DynamicViT variants
(dynamic_vit.py) and the peer methods, which are its subclasses (peers.py). This module sits
above both, so that neither of them has to import the other back.
"""

from __future__ import annotations

from typing import Any

from harness.catalog import MODEL_DEFAULTS
from models.dynamic_vit import DynamicVisionTransformer
from models.peers import PEER_CLASSES
from models.registry import register_family


def _build(variant: str = "dynamic", **kwargs: Any) -> DynamicVisionTransformer:
    """The class that computes `variant`: a peer method's subclass, else DynamicVisionTransformer.

    Args:
        variant: one of `harness.catalog.VARIANTS`: `evit`, `topk` and `tome` build their peer class
            (models/peers.py), the others `DynamicVisionTransformer`.
        **kwargs: that class's arguments (its `__init__`'s Args) and timm's ViT arguments.
    """
    return PEER_CLASSES.get(variant, DynamicVisionTransformer)(variant=variant, **kwargs)


# the entry points are attributes of this module, as timm's own model modules have them
globals().update(register_family(MODEL_DEFAULTS, "deit", _build, __name__, "DynamicViT"))
