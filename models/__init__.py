"""The DynamicViT model family, registered in timm's model registry on import.

One module per family: dynamic_vit.py (DeiT), lvvit.py (LV-ViT), swin.py (DynamicSwin),
convnext.py (DynamicCNN), peers.py (EViT, Top-K, ToMe on the DeiT backbone), deit_family.py (the
DeiT family's entry points: dynamic_vit's and peers' classes by variant); spatial.py holds
what Swin and ConvNeXt share (the T-PAMI spatial scheme). Each shared mechanism once:
predictor.py (token-score predictors), token_selection.py (hard keep decisions),
masked_attention.py (attention with a keep policy), registry.py (catalog -> timm entry points),
checkpoint.py (weights from files and URLs), validation.py (one-line argument errors).
"""

from harness.catalog import MODEL_DEFAULTS, VARIANTS
from models import deit_family  # noqa: F401 - registers the DeiT family (DynamicViT and the peers) with timm
from models.checkpoint import load_weights, read_state_dict
from models.convnext import DynamicConvNeXt
from models.dynamic_vit import (
    DynamicVisionTransformer,
    DynamicViTOutput,
)
from models.lvvit import DynamicLVViT, LVViTOutput
from models.spatial import SpatialOutput
from models.swin import DynamicSwinTransformer

__all__ = [
    "MODEL_DEFAULTS",
    "VARIANTS",
    "DynamicConvNeXt",
    "DynamicLVViT",
    "DynamicSwinTransformer",
    "DynamicViTOutput",
    "DynamicVisionTransformer",
    "LVViTOutput",
    "SpatialOutput",
    "load_weights",
    "read_state_dict",
]
