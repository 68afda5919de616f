"""The CBED symmetry augmentation: the parameter maps are exact (checked against the flow field and against
distoptica's own images), image and labels move together, and the draws are keyed on the sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.tasks.cbed import PARAMETER_RANGES, SymmetryAugmentation, flow_field
from hpctrain.tasks.cbed.augment import apply_element, mirror_parameters, quarter_turn_parameters
from hpctrain.tasks.cbed.generator import distortion_model
from hpctrain.tasks.cbed.loss import epe_of_adjusted_distortion_fields
from hpctrain.transforms import TransformContext

from ..conftest import final_weights, launch, tiny_overrides


def random_parameters(n: int, seed: int = 0) -> np.ndarray:
    low, high = np.array(PARAMETER_RANGES).T
    return np.random.default_rng(seed).uniform(low, high, size=(n, 8))


def flows(params: np.ndarray, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    flow_x, flow_y = flow_field(torch.from_numpy(params), size)
    return flow_x.numpy(), flow_y.numpy()


def test_quarter_turn_parameters_turn_the_flow_field() -> None:
    """flow'(R u) = R flow(u) with R a quarter turn counter-clockwise: (x, y) -> (-y, x)."""
    params = random_parameters(16)
    flow_x, flow_y = flows(params)
    turned_x, turned_y = flows(quarter_turn_parameters(params))
    np.testing.assert_allclose(turned_x, np.rot90(-flow_y, axes=(1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(turned_y, np.rot90(flow_x, axes=(1, 2)), rtol=0, atol=1e-12)


def test_mirror_parameters_mirror_the_flow_field() -> None:
    """flow'(M u) = M flow(u) with M the left-right mirror: (x, y) -> (-x, y)."""
    params = random_parameters(16, seed=1)
    flow_x, flow_y = flows(params)
    mirrored_x, mirrored_y = flows(mirror_parameters(params))
    np.testing.assert_allclose(mirrored_x, -np.flip(flow_x, axis=2), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mirrored_y, np.flip(flow_y, axis=2), rtol=0, atol=1e-12)


def test_group_elements_keep_the_ranges_and_the_error() -> None:
    """Every element maps the label ranges onto themselves, and the EPE of a prediction is unchanged when
    prediction and truth move together (the augmented problem is the same problem)."""
    predicted, truth = random_parameters(32, seed=2), random_parameters(32, seed=3)
    low, high = np.array(PARAMETER_RANGES).T
    base = epe_of_adjusted_distortion_fields(torch.from_numpy(predicted), torch.from_numpy(truth), 24)
    image = np.zeros((24, 24))
    for element in range(8):
        moved_predicted = np.stack([apply_element(image, p, element)[1] for p in predicted])
        moved_truth = np.stack([apply_element(image, t, element)[1] for t in truth])
        assert ((moved_truth >= low - 1e-12) & (moved_truth <= high + 1e-12)).all(), element
        moved = epe_of_adjusted_distortion_fields(torch.from_numpy(moved_predicted), torch.from_numpy(moved_truth), 24)
        torch.testing.assert_close(moved, base, rtol=1e-10, atol=1e-12)


def symmetric_pattern(size: int) -> np.ndarray:
    """Disks on a square lattice centred on the image: unchanged by quarter turns and mirrors."""
    centres = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(centres - 0.5, 0.5 - centres)
    pattern = np.zeros((size, size))
    for i in range(-2, 3):
        for j in range(-2, 3):
            pattern += np.clip((0.06 - np.hypot(x - 0.2 * i, y - 0.2 * j)) * size + 0.5, 0, 1)
    return pattern


def distorted(pattern: np.ndarray, params: np.ndarray) -> np.ndarray:
    model = distortion_model(params, pattern.shape[0])
    image = model.distort_then_resample_images(undistorted_images=torch.from_numpy(pattern).float()[None, None])
    return image[0, 0].numpy()


@pytest.mark.parametrize("element", range(1, 8))
def test_transformed_labels_describe_the_transformed_image(element: int) -> None:
    """Against distoptica itself: distorting a symmetric pattern with the moved parameters gives the moved
    image (up to distoptica's numerical inverse), while the unmoved parameters do not."""
    pattern = symmetric_pattern(48)
    params = np.array([0.4, 0.3, 0.02, -0.015, 0.03, 0.02, 0.52, 0.47])
    image = distorted(pattern, params)
    moved_image, moved_params = apply_element(image, params, element)
    error = np.abs(distorted(pattern, moved_params) - moved_image).max()
    assert error < 1e-3, error
    assert np.abs(distorted(pattern, params) - moved_image).max() > 10 * error


def batch_of(indices: list[int], size: int = 8) -> dict[str, torch.Tensor]:
    """Images with one bright pixel at each sample's distortion centre, and its labels (physical units)."""
    params = random_parameters(100, seed=4)[indices]
    images = np.zeros((len(indices), size, size), dtype=np.float32)
    for row, (cx, cy) in enumerate(params[:, 6:]):
        images[row, int((1 - cy) * size), int(cx * size)] = 1.0
    labels = params.astype(np.float32)
    return {"image": torch.from_numpy(images), "labels": torch.from_numpy(labels),
            "index": torch.tensor(indices)}


def context(indices: list[int], *, stage: str = "train", epoch: int = 1) -> TransformContext:
    return TransformContext(seed=3, stage=stage, epoch=epoch, indices=np.array(indices), position=0)


def test_augmentation_moves_image_and_labels_together() -> None:
    indices = list(range(64))
    batch = batch_of(indices)
    augmented = SymmetryAugmentation()(batch, context(indices))
    centres = augmented["labels"].numpy()[:, 6:]
    for row, (cx, cy) in enumerate(centres):
        assert augmented["image"][row, int((1 - cy) * 8), int(cx * 8)] == 1.0, row  # the marker moved with (cx, cy)
    moved = (augmented["image"] != batch["image"]).flatten(1).any(1)
    assert 0 < int(moved.sum()) < 64  # most samples move, the identity element leaves some in place
    low, high = torch.tensor(PARAMETER_RANGES, dtype=torch.float32).T
    assert ((augmented["labels"] >= low - 1e-6) & (augmented["labels"] <= high + 1e-6)).all()


def test_augmentation_draws_are_keyed_on_the_sample_and_epoch() -> None:
    augment = SymmetryAugmentation()
    together = augment(batch_of([3, 5, 9]), context([3, 5, 9]))
    alone = augment(batch_of([5]), context([5]))
    assert torch.equal(together["image"][1], alone["image"][0])  # the same draw whatever the batch around it
    assert torch.equal(together["labels"][1], alone["labels"][0])
    epochs = [augment(batch_of(list(range(32))), context(list(range(32)), epoch=e))["labels"] for e in (1, 2)]
    assert not torch.equal(*epochs)  # a new draw each epoch


def test_augmentation_leaves_validation_alone_and_checks_shapes() -> None:
    batch = batch_of([1, 2])
    untouched = SymmetryAugmentation()(batch, context([1, 2], stage="validation"))
    assert untouched["image"] is batch["image"] and untouched["labels"] is batch["labels"]
    with pytest.raises(ValueError, match="needs square images"):
        SymmetryAugmentation()({**batch, "labels": batch["labels"][:, :6]}, context([1, 2]))
    with pytest.raises(ValueError, match="stages must name some of"):
        SymmetryAugmentation(stages=["training"])


@pytest.mark.slow
def test_cbed_learns_experiment_trains_the_same_with_or_without_loader_workers(tmp_path: Path,
                                                                                tiny_data: Path) -> None:
    """experiment=cbed_learns, shrunk: the coordinate model with the augmentation in the loader, bit-identical
    weights for 0 and 2 workers."""
    weights = []
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        launch(["experiment=cbed_learns", *tiny_overrides(tiny_data, "data.prepare.image_size=32",
                                                          f"data.num_workers={workers}", "trainer.max_steps=12")],
               run_dir=run_dir)
        weights.append(final_weights(run_dir))
    assert "reduce.0.weight" in weights[0]  # the spatial head of coord_distoptica_net
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_augmented_labels_of_the_generated_file_stay_in_their_ranges(tiny_data: Path) -> None:
    """On the generator's own file (labels in physical units, as the loss reads them)."""
    import h5py

    with h5py.File(tiny_data) as file:
        batch = {"image": torch.from_numpy(file["images"][:64]), "labels": torch.from_numpy(file["labels"][:64])}
    augmented = SymmetryAugmentation()(batch, context(list(range(64))))
    low, high = torch.tensor(PARAMETER_RANGES, dtype=torch.float32).T
    assert ((augmented["labels"] >= low - 1e-6) & (augmented["labels"] <= high + 1e-6)).all()
    assert not torch.equal(augmented["labels"], batch["labels"])
