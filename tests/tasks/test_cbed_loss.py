"""The closed-form flow field and EPE against distoptica itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpctrain.tasks.cbed import denormalize, epe_of_adjusted_distortion_fields, flow_field, label_normalization
from hpctrain.tasks.cbed.generator import _sample_labels, distortion_model

NUM_PARAMETER_SETS = 20


def _distoptica_flow(labels: np.ndarray, grid_size: int) -> np.ndarray:
    """distoptica's flow field of one (8,) label vector, as a (2, N, N) float64 array."""
    # The generator's own label -> distoptica mapping: the loss must agree with how the data was made.
    model = distortion_model(labels, grid_size)
    flow_x, flow_y = model.get_flow_field_of_coord_transform(deep_copy=False)
    return np.stack([flow_x.double().numpy(), flow_y.double().numpy()])


def _epe_of_flows(predicted: np.ndarray, target: np.ndarray) -> float:
    """The research note's definition, from (2, N, N) flows: q = u + flow, q~ = q - mean(q); the grid cancels."""
    adjusted_predicted = predicted - predicted.mean(axis=(1, 2), keepdims=True)
    adjusted_target = target - target.mean(axis=(1, 2), keepdims=True)
    return float(np.linalg.norm(adjusted_target - adjusted_predicted, axis=0).mean())


@pytest.fixture(scope="module")
def parameter_sets() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return np.stack([_sample_labels(rng) for _ in range(2 * NUM_PARAMETER_SETS)])


@pytest.mark.parametrize("grid_size", [64, 48])
def test_closed_form_flow_matches_distoptica(parameter_sets: np.ndarray, grid_size: int) -> None:
    labels = parameter_sets[:NUM_PARAMETER_SETS]
    flow_x, flow_y = flow_field(torch.from_numpy(labels), grid_size)
    assert flow_x.shape == flow_y.shape == (len(labels), grid_size, grid_size)
    for k, label in enumerate(labels):
        expected = _distoptica_flow(label, grid_size)
        np.testing.assert_allclose(flow_x[k].numpy(), expected[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(flow_y[k].numpy(), expected[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("grid_size", [64, 48])
def test_epe_matches_epe_of_distoptica_flows(parameter_sets: np.ndarray, grid_size: int) -> None:
    predicted, target = parameter_sets[:NUM_PARAMETER_SETS], parameter_sets[NUM_PARAMETER_SETS:]
    epe = epe_of_adjusted_distortion_fields(torch.from_numpy(predicted), torch.from_numpy(target), grid_size)
    expected = [
        _epe_of_flows(_distoptica_flow(p, grid_size), _distoptica_flow(t, grid_size))
        for p, t in zip(predicted, target)
    ]
    np.testing.assert_allclose(epe.numpy(), expected, rtol=0, atol=1e-5)
    assert min(expected) > 1e-3  # the comparison is not vacuous


def test_moving_the_center_of_a_linear_distortion_costs_nothing() -> None:
    # With only elliptical terms the flow is linear in u - c, so moving c shifts the field uniformly,
    # which the adjustment removes.
    target = torch.tensor([[0.0, 0.0, 0.1, -0.05, 0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    predicted = target.clone()
    predicted[0, 6:] = torch.tensor([0.55, 0.45])
    assert epe_of_adjusted_distortion_fields(predicted, target, 32).item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_prediction_gives_zero_loss_and_finite_gradient(dtype: torch.dtype) -> None:
    target = torch.from_numpy(np.stack([_sample_labels(np.random.default_rng(k)) for k in range(5)])).to(dtype)
    predicted = target.clone().requires_grad_(True)
    loss = epe_of_adjusted_distortion_fields(predicted, target, 32)
    assert loss.shape == (5,)
    assert torch.all(loss == 0)
    loss.mean().backward()
    assert predicted.grad is not None and torch.all(torch.isfinite(predicted.grad))


def test_a_nan_prediction_gives_a_nan_loss() -> None:
    """A diverged model must show in its loss (the trainer skips and counts non-finite steps), never as 0."""
    target = torch.from_numpy(np.stack([_sample_labels(np.random.default_rng(k)) for k in range(3)]))
    predicted = target.clone()
    predicted[1, 2] = float("nan")
    loss = epe_of_adjusted_distortion_fields(predicted, target, 16)
    assert torch.isnan(loss[1]) and loss[0] == 0 and loss[2] == 0


def test_gradient_points_towards_the_target() -> None:
    target = torch.from_numpy(_sample_labels(np.random.default_rng(7)))[None]
    predicted = (target + 0.05).requires_grad_(True)
    loss = epe_of_adjusted_distortion_fields(predicted, target, 32).sum()
    loss.backward()
    with torch.no_grad():
        stepped = predicted - 1e-3 * predicted.grad
    assert epe_of_adjusted_distortion_fields(stepped, target, 32).item() < loss.item()


def test_denormalize_inverts_the_normalisation() -> None:
    weight, bias = (torch.from_numpy(a) for a in label_normalization())
    labels = torch.from_numpy(np.stack([_sample_labels(np.random.default_rng(k)) for k in range(10)])).float()
    np.testing.assert_allclose(denormalize(weight * labels + bias, weight, bias).numpy(), labels.numpy(), atol=1e-6)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        epe_of_adjusted_distortion_fields(torch.zeros(2, 8), torch.zeros(3, 8), 16)
