"""DistopticaNet: shapes, configuration errors, micro-batches of one, deterministic initialisation."""

from __future__ import annotations

import pytest
import torch

from hpctrain.tasks.cbed import CBEDModelConfig, DistopticaNet, check_image_size


def _small_config(**overrides: object) -> CBEDModelConfig:
    return CBEDModelConfig(**{"image_size": 32, "width": 4, "num_stages": 2, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("input_shape", [(3, 32, 32), (3, 1, 32, 32)])
def test_output_shape(norm: str, input_shape: tuple[int, ...]) -> None:
    model = DistopticaNet(_small_config(norm=norm))
    assert model(torch.rand(input_shape)).shape == (3, 8)


def test_default_model_output_shape() -> None:
    assert DistopticaNet(CBEDModelConfig())(torch.rand(2, 64, 64)).shape == (2, 8)


def test_total_downsampling_is_two_to_the_number_of_stages() -> None:
    model = DistopticaNet(_small_config(num_stages=3, blocks_per_stage=2))
    assert model.stages(model.stem(torch.rand(1, 1, 32, 32))).shape == (1, 16, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"image_size": 60, "num_stages": 3},
            r"model.image_size=60 must be a positive multiple of 2\*\*model.num_stages = 8",
        ),
        ({"image_size": 4, "num_stages": 3}, "model.image_size=4 must be a positive multiple"),
        ({"norm": "layer"}, "model.norm must be one of group, batch, none, got 'layer'"),
        ({"width": 0}, "model.width must be >= 1, got 0"),
        ({"num_stages": 0}, "model.num_stages must be >= 1"),
        ({"head": "attention"}, "model.head must be one of pool, spatial, got 'attention'"),
        ({"head": "spatial", "image_size": None}, "model.head=spatial needs model.image_size"),
        ({"hidden": 0}, "model.hidden must be >= 1 or null, got 0"),
    ],
)
def test_bad_config_raises(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _small_config(**overrides)


def test_check_image_size_names_the_sizes() -> None:
    check_image_size(CBEDModelConfig(), 128)  # no image_size: any size the stages can halve
    config = CBEDModelConfig(image_size=64)
    check_image_size(config, 64)
    with pytest.raises(ValueError, match="model.image_size=64 but the data has 128x128 images"):
        check_image_size(config, 128)
    with pytest.raises(ValueError, match="image size 100 must be a positive multiple of 2\\*\\*model.num_stages = 8"):
        check_image_size(config, 100)


def test_batch_of_one_trains() -> None:
    model = DistopticaNet(_small_config()).train()
    loss = model(torch.rand(1, 32, 32)).square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_group_norm_makes_samples_independent_of_their_batch() -> None:
    model = DistopticaNet(_small_config()).train()
    images = torch.rand(4, 32, 32, dtype=torch.float64)
    model.double()
    torch.testing.assert_close(model(images)[:1], model(images[:1]))


def test_initialisation_is_deterministic_and_starts_mid_range() -> None:
    torch.manual_seed(3)
    first = DistopticaNet(_small_config())
    torch.manual_seed(3)
    second = DistopticaNet(_small_config())
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(4)
    third = DistopticaNet(_small_config())
    assert not torch.equal(first.stem[0].weight, third.stem[0].weight)
    torch.testing.assert_close(first(torch.rand(2, 32, 32)), torch.full((2, 8), 0.5), atol=0.05, rtol=0)


def test_contrast_enhancement_ignores_offset_and_scale() -> None:
    model = DistopticaNet(_small_config())
    images = torch.rand(2, 32, 32)
    torch.testing.assert_close(model(images), model(3.0 * images + 7.0), atol=1e-5, rtol=0)


def test_forward_refuses_images_of_the_wrong_size_or_shape() -> None:
    model = DistopticaNet(image_size=32, width=4, num_stages=2)  # keyword arguments, as the Hydra node gives them
    assert model(torch.rand(2, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="model.image_size=32 but the data has 16x16 images"):
        model(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="square single-channel images"):
        model(torch.rand(2, 3, 32, 32))


def _coordinate_model(**overrides: object) -> DistopticaNet:
    config = dict(image_size=32, width=8, num_stages=2, coord_channels=True, head="spatial", head_channels=4,
                  hidden=16)
    return DistopticaNet(**{**config, **overrides})


def test_coordinate_model_shapes_and_head_size() -> None:
    model = _coordinate_model()
    assert model.stem[0].in_channels == 3  # the image and its x/y coordinate channels
    assert model.head[0].in_features == 4 * 8 * 8  # head_channels x (32 / 2**2)^2 positions
    assert model(torch.rand(5, 32, 32)).shape == (5, 8)
    assert "coordinates" not in model.state_dict()  # rebuilt from the config, not checkpointed


def test_coordinate_channels_follow_the_loss_grid() -> None:
    """The x/y channels are the loss's pixel-centre coordinates (x right, y up), mapped onto [-1, 1]."""
    model = _coordinate_model()
    pixel_centres = (torch.arange(32, dtype=torch.float32) + 0.5) / 32
    x, y = model.coordinates[0]
    torch.testing.assert_close(x[5], 2 * pixel_centres - 1)  # every row: x grows along the columns
    torch.testing.assert_close(y[:, 7], 2 * (1 - pixel_centres) - 1)  # y is largest in row 0, the top


def test_coordinate_model_without_image_size_pools_any_size() -> None:
    model = DistopticaNet(width=8, num_stages=2, coord_channels=True)
    assert model(torch.rand(2, 16, 16)).shape == model(torch.rand(2, 32, 32)).shape == (2, 8)
