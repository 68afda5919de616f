"""The CBED task's symmetry augmentation: rotate each training image by a multiple of 90 degrees and/or mirror it,
and transform its 8 distortion parameters exactly as the image moved (a `data.transforms` entry).

A quarter turn or a mirror of a distorted pattern is the same distortion model with other parameters; with the
coordinates of ``loss.py`` (x right, y up, fractions of the image width) a point u about the image centre goes to

- quarter turn counter-clockwise (``np.rot90``): (x, y) -> (-y, x), so [A, S, E1, E2, P1, P2, cx, cy] becomes
  [A, S, -E1, -E2, -P2, P1, 1 - cy, cx];
- mirror left-right (``np.flip`` of the columns): (x, y) -> (-x, y), so it becomes
  [A, -S, E1, -E2, -P1, P2, 1 - cx, cy].

(The radial and spiral terms are invariant under rotation, the spiral changes sign under a mirror; the elliptical
term rotates at twice the angle, the parabolic term with it.) Eight symmetric versions of every image multiply the
data the model sees; tests check the parameter maps against the flow field and distoptica's images. Every
``PARAMETER_RANGES`` entry maps onto itself, so augmented labels stay in their ranges.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from hpctrain.transforms import Batch, TransformContext, check_stages

# The dihedral group of the square: element g mirrors when g >= 4, then turns (g % 4) quarter turns.
NUM_ELEMENTS = 8


def quarter_turn_parameters(params: np.ndarray) -> np.ndarray:
    """Physical parameters (..., 8) of the pattern turned a quarter counter-clockwise."""
    a, s, e1, e2, p1, p2, cx, cy = np.moveaxis(params, -1, 0)
    return np.stack([a, s, -e1, -e2, -p2, p1, 1 - cy, cx], axis=-1)


def mirror_parameters(params: np.ndarray) -> np.ndarray:
    """Physical parameters (..., 8) of the pattern mirrored left-right."""
    a, s, e1, e2, p1, p2, cx, cy = np.moveaxis(params, -1, 0)
    return np.stack([a, -s, e1, -e2, -p1, p2, 1 - cx, cy], axis=-1)


def apply_element(image: np.ndarray, params: np.ndarray, element: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (N, N) and its physical parameters (8,) under group element 0..7 (mirror if >= 4, then turns)."""
    if element >= 4:
        image, params = np.flip(image, axis=-1), mirror_parameters(params)
    for _ in range(element % 4):
        image, params = np.rot90(image, axes=(-2, -1)), quarter_turn_parameters(params)
    return image, params


class SymmetryAugmentation:
    """Turn each sample by a random multiple of 90 degrees and, with `mirror`, mirror it, with its labels.

    `image` and `labels` name the batch's fields: (B, N, N) images and (B, 8) physical parameters as the
    generator writes them. The group element is drawn per sample from the TransformContext, keyed on (seed, stage,
    epoch, sample), so any number of loader workers and ranks, and a resumed run, see the same augmented data.
    Training stage only by default: validation stays comparable with the baselines.
    """

    def __init__(self, *, image: str = "image", labels: str = "labels", mirror: bool = True,
                 stages: Sequence[str] = ("train",)) -> None:
        self.image, self.labels, self.mirror = image, labels, mirror
        self.stages = check_stages(stages)

    def __call__(self, batch: Batch, context: TransformContext) -> Batch:
        if context.stage not in self.stages:
            return batch
        images = batch[self.image].numpy()
        labels = batch[self.labels].numpy()
        if images.ndim != 3 or images.shape[1] != images.shape[2] or labels.shape != (len(images), 8):
            raise ValueError(f"SymmetryAugmentation needs square images (B, N, N) in field {self.image!r} and "
                             f"(B, 8) labels in {self.labels!r}, got {images.shape} and {labels.shape}")
        out_images = np.empty_like(images)
        out_labels = np.empty_like(labels)
        for row, rng in enumerate(context.generators()):
            element = int(rng.integers(NUM_ELEMENTS if self.mirror else 4))
            out_images[row], out_labels[row] = apply_element(images[row], labels[row], element)
        return {**batch, self.image: torch.from_numpy(out_images), self.labels: torch.from_numpy(out_labels)}
