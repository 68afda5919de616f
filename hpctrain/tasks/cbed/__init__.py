"""The built-in demo task: estimate the 8 distortion parameters of a synthetic distorted CBED pattern.

``generator`` writes the images and labels to HDF5, ``model`` holds the network, ``loss`` the
differentiable end-point error of the adjusted distortion fields.
"""

from hpctrain.tasks.cbed.generator import (
    PARAMETER_NAMES,
    PARAMETER_RANGES,
    CBEDGeneratorConfig,
    generate_dataset,
    generate_example,
    label_normalization,
)
from hpctrain.tasks.cbed.loss import denormalize, epe_of_adjusted_distortion_fields, flow_field
from hpctrain.tasks.cbed.model import CBEDModelConfig, DistopticaNet, check_image_size

__all__ = [
    "PARAMETER_NAMES",
    "PARAMETER_RANGES",
    "CBEDGeneratorConfig",
    "CBEDModelConfig",
    "DistopticaNet",
    "check_image_size",
    "denormalize",
    "epe_of_adjusted_distortion_fields",
    "flow_field",
    "generate_dataset",
    "generate_example",
    "label_normalization",
]
