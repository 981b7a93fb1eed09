"""Vector fields and ResNet presets."""

from stepjax.layers import Conv, Projection, batch_norm
from stepjax.models.factory import DTYPES, NSI_PREFIX, build_model, is_nsi_placement, placement_masks
from stepjax.models.fields import FIELDS, BasicField, BottleneckField
from stepjax.models.resnet import (
    FAST_COMPILE,
    PRESETS,
    RandomPlacement,
    ResNet,
    ResNetSpec,
    count_params,
    get_spec,
    make_model,
    resolve_placement,
)

__all__ = [
    "DTYPES",
    "FAST_COMPILE",
    "FIELDS",
    "NSI_PREFIX",
    "PRESETS",
    "BasicField",
    "BottleneckField",
    "Conv",
    "Projection",
    "RandomPlacement",
    "ResNet",
    "ResNetSpec",
    "batch_norm",
    "build_model",
    "count_params",
    "get_spec",
    "is_nsi_placement",
    "make_model",
    "placement_masks",
    "resolve_placement",
]
