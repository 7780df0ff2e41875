"""Batched augmentation against a plain reference, and the share of samples each step changes.

The reference computes every step for every sample, then keeps the result
of the samples that the random draws select. It draws the same random
numbers in the same order as `resmom.data.augment`, so with the same seed
both must make the same views up to float rounding and leave their
generators in the same state.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resmom.data import augment
from resmom.data.augment import (
    TwoViewAugment,
    color_jitter,
    random_gaussian_blur,
    random_grayscale,
    random_resized_crop_flip,
    random_solarize,
)
from resmom.specs import AugmentSpec

CPU = torch.device("cpu")
BYOL = AugmentSpec(crop_scale=(0.08, 1.0))
LUMA = torch.tensor([0.299, 0.587, 0.114])
TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _draw(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _chosen(count: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Return a (count, 1, 1, 1) mask, True for the samples that a step changes."""
    return (torch.rand(count, generator=generator) < p).view(count, 1, 1, 1)


def _reference_luma(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,c->bhw", images, LUMA).unsqueeze(1)


def reference_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    flip_p: float,
    generator: torch.Generator,
    source_aspect: torch.Tensor | None = None,
) -> torch.Tensor:
    count = len(images)
    area = _draw(scale[0], scale[1], count, generator)
    aspect = torch.exp(_draw(math.log(3 / 4), math.log(4 / 3), count, generator))
    if source_aspect is not None:
        aspect = aspect / source_aspect
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    center_x = (1 - width) * _draw(-1, 1, count, generator)
    center_y = (1 - height) * _draw(-1, 1, count, generator)
    mirrored = torch.rand(count, generator=generator) < flip_p
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = torch.where(mirrored, -width, width)
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [count, 3, size, size], align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def reference_jitter(
    images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator
) -> torch.Tensor:
    count = len(images)
    chosen = _chosen(count, spec.jitter_p, generator)
    factors = [
        _draw(max(0.0, 1 - strength), 1 + strength, count, generator).view(count, 1, 1, 1)
        for strength in (spec.brightness, spec.contrast, spec.saturation)
    ]
    angle = _draw(-spec.hue, spec.hue, count, generator) * 2 * math.pi
    brightness, contrast, saturation = factors

    out = (images * brightness).clamp(0, 1)
    mean = _reference_luma(out).mean(dim=(2, 3), keepdim=True)
    out = (mean + contrast * (out - mean)).clamp(0, 1)
    gray = _reference_luma(out)
    out = (gray + saturation * (out - gray)).clamp(0, 1)

    # Hue: turn the (I, Q) chroma plane of every pixel by the sample's angle.
    y, i, q = torch.einsum("jc,bchw->jbhw", TO_YIQ, out)
    cos, sin = torch.cos(angle).view(count, 1, 1), torch.sin(angle).view(count, 1, 1)
    turned = torch.stack((y, cos * i - sin * q, sin * i + cos * q))
    out = torch.einsum("cj,jbhw->bchw", torch.linalg.inv(TO_YIQ), turned).clamp(0, 1)
    return torch.where(chosen, out, images)


def reference_grayscale(images: torch.Tensor, p: float, generator: torch.Generator):
    chosen = _chosen(len(images), p, generator)
    return torch.where(chosen, _reference_luma(images).expand_as(images), images)


def reference_blur(
    images: torch.Tensor,
    p: float,
    sigma_range: tuple[float, float],
    kernel_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    chosen = _chosen(len(images), p, generator)
    sigma = _draw(sigma_range[0], sigma_range[1], len(images), generator)
    blurred = torch.stack(
        [
            gaussian_blur(image, [kernel_size] * 2, [value.item()] * 2)
            for image, value in zip(images, sigma, strict=True)
        ]
    )
    return torch.where(chosen, blurred, images)


def reference_solarize(
    images: torch.Tensor, p: float, threshold: float, generator: torch.Generator
) -> torch.Tensor:
    chosen = _chosen(len(images), p, generator)
    return torch.where(chosen & (images >= threshold), 1 - images, images)


def reference_view(
    scaled: torch.Tensor,
    spec: AugmentSpec,
    size: int,
    index: int,
    kernel_size: int,
    generator: torch.Generator,
    source_aspect: torch.Tensor | None,
) -> torch.Tensor:
    out = reference_crop(scaled, size, spec.crop_scale, spec.flip_p, generator, source_aspect)
    out = reference_jitter(out, spec, generator)
    out = reference_grayscale(out, spec.grayscale_p, generator)
    out = reference_blur(out, spec.blur_p[index], spec.blur_sigma, kernel_size, generator)
    return reference_solarize(out, spec.solarize_p[index], spec.solarize_threshold, generator)


def _images(count: int, side: int, seed: int) -> torch.Tensor:
    """Return (count, 3, side, side) floats in [0, 1]: smooth colour fields plus noise."""
    generator = torch.Generator().manual_seed(seed)
    fields = F.interpolate(torch.rand(count, 3, 4, 4, generator=generator), size=(side, side))
    noise = 0.1 * torch.randn(count, 3, side, side, generator=generator)
    return (fields + noise).clamp(0, 1)


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


def _assert_same_state(first: torch.Generator, second: torch.Generator) -> None:
    assert torch.equal(first.get_state(), second.get_state()), "different number of draws"


@pytest.mark.parametrize("with_aspect", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_crop_matches_reference(seed: int, with_aspect: bool):
    images = _images(16, 37, seed)
    aspects = torch.linspace(0.5, 2.0, 16) if with_aspect else None
    ours_generator, reference_generator = _generators(seed)
    ours = random_resized_crop_flip(
        images, 32, BYOL.crop_scale, 0.5, ours_generator, source_aspect=aspects
    )
    expected = reference_crop(
        images, 32, BYOL.crop_scale, 0.5, reference_generator, source_aspect=aspects
    )
    # The two grids round differently, by a few millionths of a pixel.
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    _assert_same_state(ours_generator, reference_generator)


@pytest.mark.parametrize("jitter_p", [0.0, 0.5, 1.0])
def test_jitter_matches_reference(jitter_p: float):
    spec = BYOL.model_copy(update={"jitter_p": jitter_p})
    images = _images(24, 16, seed=2)
    ours_generator, reference_generator = _generators(3)
    ours = color_jitter(images, spec, ours_generator)
    expected = reference_jitter(images, spec, reference_generator)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    _assert_same_state(ours_generator, reference_generator)


def test_jitter_strong_factors_match_reference():
    # Factors far from 1 drive many pixels into the clamps at 0 and 1.
    spec = BYOL.model_copy(
        update={"jitter_p": 1.0, "brightness": 0.9, "contrast": 0.9, "saturation": 0.9, "hue": 0.5}
    )
    images = _images(24, 16, seed=4)
    ours_generator, reference_generator = _generators(5)
    ours = color_jitter(images, spec, ours_generator)
    expected = reference_jitter(images, spec, reference_generator)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_grayscale_matches_reference(p: float):
    images = _images(24, 16, seed=6)
    ours_generator, reference_generator = _generators(7)
    ours = random_grayscale(images, p, ours_generator)
    expected = reference_grayscale(images, p, reference_generator)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    _assert_same_state(ours_generator, reference_generator)


# 3 and 7 taps run as one 2-D convolution on the CPU, 9 taps as two 1-D passes.
@pytest.mark.parametrize("kernel_size", [3, 7, 9])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_blur_matches_reference(p: float, kernel_size: int):
    images = _images(12, 20, seed=8)
    ours_generator, reference_generator = _generators(9)
    ours = random_gaussian_blur(images, p, BYOL.blur_sigma, kernel_size, ours_generator)
    expected = reference_blur(images, p, BYOL.blur_sigma, kernel_size, reference_generator)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    _assert_same_state(ours_generator, reference_generator)


@pytest.mark.parametrize(("p", "threshold"), [(0.0, 0.5), (0.4, 0.5), (1.0, 0.5), (0.6, 0.3)])
def test_solarize_matches_reference(p: float, threshold: float):
    images = _images(24, 16, seed=10)
    ours_generator, reference_generator = _generators(11)
    ours = random_solarize(images, p, threshold, ours_generator)
    expected = reference_solarize(images, p, threshold, reference_generator)
    assert torch.equal(ours, expected)
    _assert_same_state(ours_generator, reference_generator)


@pytest.mark.parametrize("with_aspect", [False, True])
def test_two_views_match_reference(with_aspect: bool):
    batch = torch.randint(0, 256, (16, 3, 37, 37), generator=torch.Generator().manual_seed(12))
    batch = batch.to(torch.uint8)
    aspects = torch.linspace(0.6, 1.8, 16) if with_aspect else None
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ours = TwoViewAugment(BYOL, 32, tuple(mean), tuple(std), seed=13, device=CPU)
    reference_generator = torch.Generator().manual_seed(13)
    scaled = batch.float() / 255
    # Three batches in a row, so each starts from the generator state the last one left.
    for _ in range(3):
        views = ours(batch, aspects)
        for index, view in enumerate(views):
            expected = reference_view(
                scaled, BYOL, 32, index, ours.kernel_size, reference_generator, aspects
            )
            expected = (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
            torch.testing.assert_close(view, expected, atol=5e-4, rtol=0)
    _assert_same_state(ours.generator, reference_generator)


@pytest.mark.parametrize(
    "step",
    [
        lambda images, generator: color_jitter(images, BYOL, generator),
        lambda images, generator: random_grayscale(images, 0.5, generator),
        lambda images, generator: random_gaussian_blur(images, 0.5, (0.5, 2.0), 5, generator),
        lambda images, generator: random_solarize(images, 0.5, 0.5, generator),
    ],
    ids=["jitter", "grayscale", "blur", "solarize"],
)
def test_steps_leave_input_unchanged(step):
    images = _images(16, 12, seed=14)
    before = images.clone()
    out = step(images, torch.Generator().manual_seed(15))
    assert torch.equal(images, before)
    assert not torch.equal(out, before)


def test_mask_path_matches_index_path(monkeypatch: pytest.MonkeyPatch):
    # Off the CPU the steps transform every sample and keep the selected
    # results with a mask. Forcing that path on the CPU must change nothing.
    images = _images(24, 16, seed=16)

    def run_all_steps() -> torch.Tensor:
        generator = torch.Generator().manual_seed(17)
        out = color_jitter(images, BYOL, generator)
        out = random_grayscale(out, 0.5, generator)
        out = random_gaussian_blur(out, 0.5, BYOL.blur_sigma, 5, generator)
        return random_solarize(out, 0.5, 0.5, generator)

    indexed = run_all_steps()
    monkeypatch.setattr(augment, "_INDEXED_DEVICE_TYPES", ())
    torch.testing.assert_close(run_all_steps(), indexed, atol=1e-6, rtol=0)


def _changed_samples(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (after != before).flatten(1).any(dim=1)


@pytest.mark.parametrize(
    ("name", "step", "p"),
    [
        ("jitter", lambda x, g: color_jitter(x, BYOL.model_copy(update={"jitter_p": 0.3}), g), 0.3),
        ("grayscale", lambda x, g: random_grayscale(x, 0.2, g), 0.2),
        ("blur", lambda x, g: random_gaussian_blur(x, 0.1, (0.5, 2.0), 3, g), 0.1),
        ("solarize", lambda x, g: random_solarize(x, 0.2, 0.5, g), 0.2),
    ],
)
def test_changed_share_matches_probability(name: str, step, p: float):
    count = 4000
    images = _images(count, 6, seed=18)
    out = step(images, torch.Generator().manual_seed(19))
    share = _changed_samples(images, out).float().mean().item()
    # Four standard deviations of a binomial share, so a correct step fails about once in
    # 16,000 seeds (normal approximation).
    tolerance = 4 * math.sqrt(p * (1 - p) / count)
    assert abs(share - p) < tolerance, f"{name} changed {share:.3f} of the samples, expected {p}"


def test_solarize_inverts_pixels_from_threshold():
    images = _images(64, 8, seed=20)
    images[:, :, 0, 0] = 0.75  # exactly at the threshold, so inverted
    out = random_solarize(images, 1.0, 0.75, torch.Generator().manual_seed(21))
    high = images >= 0.75
    assert high.any()
    assert (~high).any()
    assert torch.equal(out[:, :, 0, 0], torch.full((64, 3), 0.25))
    assert torch.equal(out[high], 1 - images[high])
    assert torch.equal(out[~high], images[~high])


def test_jitter_changes_only_selected_samples():
    images = _images(200, 8, seed=22)
    out = color_jitter(
        images, BYOL.model_copy(update={"jitter_p": 0.5}), torch.Generator().manual_seed(23)
    )
    # The selection is the step's first draw.
    selected = torch.rand(200, generator=torch.Generator().manual_seed(23)) < 0.5
    assert 0 < selected.sum() < len(images)
    assert torch.equal(_changed_samples(images, out), selected)
    assert torch.equal(out[~selected], images[~selected])
