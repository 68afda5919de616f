"""The built-in demo task, a plug-in like a user's own: estimate the 8 distortion parameters of a synthetic
distorted CBED pattern (after emicroml). Selected with `task=cbed_distortion` (conf/task/).

``generator`` writes the images and labels to HDF5 (``python -m hpctrain.tasks.cbed.generate``), ``model``
holds the network, ``augment`` the symmetry augmentation, ``loss`` the differentiable end-point error of the
adjusted distortion fields, and ``objectives`` the task's loss and metrics on hpctrain's contract.
"""

from hpctrain.tasks.cbed.augment import SymmetryAugmentation
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
from hpctrain.tasks.cbed.objectives import (EndPointErrorLoss, LabelMeanEPE, NoDistortionEPE, ParameterErrors,
                                            ParameterPredictions)
from hpctrain.tasks.cbed.plots import CBEDPlots

__all__ = [
    "PARAMETER_NAMES",
    "PARAMETER_RANGES",
    "CBEDGeneratorConfig",
    "CBEDModelConfig",
    "DistopticaNet",
    "CBEDPlots",
    "EndPointErrorLoss",
    "LabelMeanEPE",
    "ParameterPredictions",
    "NoDistortionEPE",
    "ParameterErrors",
    "SymmetryAugmentation",
    "check_image_size",
    "denormalize",
    "epe_of_adjusted_distortion_fields",
    "flow_field",
    "generate_dataset",
    "generate_example",
    "label_normalization",
]
