"""The DynamicViT family, registered in timm's model registry on import."""
from models.checkpoint import load_weights, read_state_dict
from harness.catalog import MODEL_DEFAULTS, VARIANTS
from models.dynamic_vit import (
    DynamicViTOutput,
    DynamicVisionTransformer,
)
from models.lvvit import DynamicLVViT, LVViTOutput
from models.convnext import DynamicConvNeXt
from models.spatial import SpatialOutput
from models.swin import DynamicSwinTransformer

__all__ = [
    "MODEL_DEFAULTS",
    "VARIANTS",
    "DynamicViTOutput",
    "DynamicVisionTransformer",
    "DynamicLVViT",
    "LVViTOutput",
    "DynamicConvNeXt",
    "DynamicSwinTransformer",
    "SpatialOutput",
    "load_weights",
    "read_state_dict",
]
