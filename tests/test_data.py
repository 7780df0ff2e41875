from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from resmom.data import digits
from resmom.data.augment import (
    TwoViewAugment,
    blur_kernel_size,
    crop_sides,
    gaussian_blur,
    random_gaussian_blur,
    random_resized_crop_flip,
    random_solarize,
)
from resmom.data.beton import (
    ConversionOptions,
    DataError,
    check_beton,
    manifest_path,
    prepare,
    write_beton,
)
from resmom.data.loaders import eval_loader, train_loader
from resmom.data.sources import ArraySource, check_source
from resmom.specs import AugmentSpec

CPU = torch.device("cpu")


def _read_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    loader = eval_loader(path, batch_size=500, rank=0, world_size=1, threads=1, device=CPU)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in loader], strict=True)
    return np.concatenate(images), np.concatenate(labels)


def test_digits_split_is_stratified():
    splits = digits.digits_splits()
    assert len(splits["train"].labels) + len(splits["test"].labels) == 1797
    train_share = np.bincount(splits["train"].labels) / len(splits["train"].labels)
    test_share = np.bincount(splits["test"].labels) / len(splits["test"].labels)
    assert np.abs(train_share - test_share).max() < 0.01


def test_digits_beton_round_trip(digits_paths: dict[str, Path]):
    expected = digits.digits_splits()
    for split in ("train", "test"):
        manifest = check_beton(digits_paths[split], verify_checksum=True)
        images, labels = _read_all(digits_paths[split])
        assert manifest["count"] == len(expected[split].labels)
        assert manifest["classes"] == list(range(10))
        assert images.shape == (len(expected[split].labels), 3, 32, 32)
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected[split].labels)
        np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), expected[split].images)


def test_prepare_reuses_valid_files(digits_paths: dict[str, Path], data_dir: Path):
    before = digits_paths["train"].stat().st_mtime_ns
    prepare("digits", data_dir)
    assert digits_paths["train"].stat().st_mtime_ns == before


def _arrays(images: np.ndarray, labels: np.ndarray) -> ArraySource:
    return ArraySource(images, labels, tuple(str(c) for c in range(10)), "test arrays")


RAW = ConversionOptions("raw")


def test_missing_manifest_rejected_and_rewritten(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "small.beton"
    write_beton(path, _arrays(images, np.arange(12) % 3), RAW)
    manifest_path(path).unlink()
    with pytest.raises(DataError, match="conversion did not finish"):
        check_beton(path)


def test_checksum_mismatch_rejected(tmp_path: Path):
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "small.beton"
    write_beton(path, _arrays(images, np.arange(4)), RAW)
    with path.open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    with pytest.raises(DataError, match="checksum"):
        check_beton(path, verify_checksum=True)


def test_check_rejects_bad_arrays(tmp_path: Path):
    with pytest.raises(DataError, match="uint8"):
        check_source(_arrays(np.zeros((4, 8, 8, 3), dtype=np.float32), np.arange(4)))


def test_write_fails_on_bad_sample_and_leaves_nothing(tmp_path: Path):
    # Unchecked float images reach the writer, which must fail instead of hanging.
    path = tmp_path / "bad.beton"
    with pytest.raises(DataError, match="uint8"):
        write_beton(path, _arrays(np.zeros((4, 8, 8, 3), dtype=np.float32), np.arange(4)), RAW)
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_versions(digits_paths: dict[str, Path]):
    manifest = json.loads(manifest_path(digits_paths["test"]).read_text())
    assert set(manifest["versions"]) == {"ffcv", "numpy", "pillow", "resmom"}
    assert manifest["source"] == "sklearn.datasets.load_digits test"
    assert manifest["options"] == {"write_mode": "raw", "max_resolution": None, "jpeg_quality": 90}


def test_two_view_loader_yields_independent_views(digits_paths: dict[str, Path]):
    loader = train_loader(
        digits_paths["train"], 64, seed=0, distributed=False, threads=1, device=CPU
    )
    augment = TwoViewAugment(AugmentSpec(), 32, digits.MEAN, digits.STD, seed=0, device=CPU)
    images, labels, aspects = next(iter(loader))
    view_a, view_b = augment(images, aspects)
    assert images.shape == (64, 3, 32, 32)
    assert labels.shape == (64,)
    assert torch.equal(aspects, torch.ones(64, dtype=aspects.dtype))
    assert view_a.shape == view_b.shape == (64, 3, 32, 32)
    assert view_a.dtype == torch.float32
    assert not torch.allclose(view_a, view_b)
    # Normalized views are roughly centred; a crop of a bright region may shift this.
    assert view_a.mean().abs() < 1.0


def test_full_square_crop_is_identity_and_flip_mirrors():
    images = torch.rand(4, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    unflipped = random_resized_crop_flip(images, 16, (1.0, 1.0), 0.0, generator, ratio=(1.0, 1.0))
    flipped = random_resized_crop_flip(images, 16, (1.0, 1.0), 1.0, generator, ratio=(1.0, 1.0))
    assert torch.allclose(unflipped, images, atol=1e-5)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)


def test_augment_grayscale_makes_channels_equal():
    spec = AugmentSpec(flip_p=0.0, jitter_p=0.0, grayscale_p=1.0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    view_a, _ = TwoViewAugment(spec, 16, (0.0,) * 3, (1.0,) * 3, seed=0, device=CPU)(images)
    assert torch.allclose(view_a[:, 0], view_a[:, 1])
    assert torch.allclose(view_a[:, 1], view_a[:, 2])


def test_augment_reproducible_from_seed():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    first = TwoViewAugment(AugmentSpec(), 16, (0.0,) * 3, (1.0,) * 3, seed=3, device=CPU)(images)
    second = TwoViewAugment(AugmentSpec(), 16, (0.0,) * 3, (1.0,) * 3, seed=3, device=CPU)(images)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_blur_matches_torchvision_per_sample():
    from torchvision.transforms.functional import gaussian_blur as reference_blur

    images = torch.rand(3, 3, 20, 24)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    blurred = gaussian_blur(images, sigma, kernel_size=7)
    for index in range(3):
        expected = reference_blur(images[index], [7, 7], [sigma[index].item()] * 2)
        torch.testing.assert_close(blurred[index], expected, atol=1e-5, rtol=0)


def test_blur_probability_zero_and_one():
    images = torch.rand(8, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    unchanged = random_gaussian_blur(images, 0.0, (0.1, 2.0), 3, generator)
    changed = random_gaussian_blur(images, 1.0, (1.0, 2.0), 3, generator)
    assert torch.equal(unchanged, images)
    assert (changed - images).abs().amax(dim=(1, 2, 3)).min() > 0.05


def test_blur_kernel_size_rule():
    assert blur_kernel_size(224, 0.1) == 23  # BYOL's 23x23 kernel at 224 pixels
    assert blur_kernel_size(32, 0.1) == 3
    assert blur_kernel_size(96, 0.1) == 11


def test_solarize_inverts_pixels_above_threshold():
    images = torch.tensor([0.1, 0.49, 0.5, 0.9]).view(1, 1, 1, 4)
    generator = torch.Generator().manual_seed(0)
    solarized = random_solarize(images, 1.0, 0.5, generator)
    torch.testing.assert_close(solarized.flatten(), torch.tensor([0.1, 0.49, 0.5, 0.1]))
    assert torch.equal(random_solarize(images, 0.0, 0.5, generator), images)


def test_blur_and_solarize_probability_per_view():
    # Only blur on view a and only solarization on view b; everything else off.
    spec = AugmentSpec(
        crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
        blur_p=(1.0, 0.0), blur_sigma=(2.0, 2.0), solarize_p=(0.0, 1.0),
    )  # fmt: skip
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    augment = TwoViewAugment(spec, 16, (0.0,) * 3, (1.0,) * 3, seed=0, device=CPU)
    augment.kernel_size = 5
    view_a, view_b = augment(images)
    crops = random_resized_crop_flip(
        images.float() / 255, 16, (1.0, 1.0), 0.0, torch.Generator().manual_seed(0)
    )
    # A full-area crop with a random aspect ratio is not the identity, so the
    # check compares statistics that blur and solarization change.
    assert view_a.std() < 0.8 * crops.std()
    assert view_b.max() <= 0.5 + 1e-6


def test_eval_loader_center_crop_shape(digits_paths: dict[str, Path]):
    loader = eval_loader(digits_paths["test"], 50, 0, 1, 1, CPU, resolution=24, crop_fraction=0.875)
    images, labels = next(iter(loader))
    assert images.shape == (50, 3, 24, 24)
    assert images.dtype == torch.uint8
    assert labels.shape == (50,)


def test_crop_sides_keep_original_proportions():
    # A 2:1 image squashed into a square: a square crop of half its area is
    # its full height and half its width.
    area, aspect = torch.tensor([0.5, 0.2]), torch.tensor([1.0, 1.5])
    width, height = crop_sides(area, aspect, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(width, torch.tensor([0.5, (0.2 * 1.5 / 2) ** 0.5]))
    torch.testing.assert_close(height, torch.tensor([1.0, (0.2 * 2 / 1.5) ** 0.5]))
    # In original pixels the area fraction is width * height, the aspect ratio 2 * width / height.
    torch.testing.assert_close(width * height, area)
    torch.testing.assert_close(2 * width / height, aspect)


def test_crop_sides_square_source_unchanged():
    area, aspect = torch.tensor([0.3]), torch.tensor([0.8])
    width, height = crop_sides(area, aspect, None)
    same_width, same_height = crop_sides(area, aspect, torch.tensor([1.0]))
    assert torch.equal(width, same_width)
    assert torch.equal(height, same_height)


def test_data_spec_fills_dataset_defaults():
    from resmom.specs import DataSpec

    imagenet = DataSpec(dataset="imagenet")
    assert (imagenet.resolution, imagenet.write_mode, imagenet.max_resolution) == (224, "jpg", 256)
    cifar = DataSpec(dataset="cifar10", resolution=24)
    assert (cifar.resolution, cifar.write_mode, cifar.max_resolution) == (24, "raw", None)
    assert DataSpec(dataset="imagefolder:/data/tree").write_mode == "jpg"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dataset": "cifar10", "train_split": "unlabeled"}, "only stl10"),
        ({"dataset": "imagefolder:"}, "unknown dataset"),
        ({"augment": {"blur_p": [1.0, 1.5]}}, "blur_p must hold two probabilities"),
        ({"augment": {"blur_sigma": [2.0, 0.1]}}, "blur_sigma must satisfy"),
    ],
)
def test_data_spec_rejects_invalid_fields(fields: dict, message: str):
    from pydantic import ValidationError

    from resmom.specs import DataSpec

    with pytest.raises(ValidationError, match=message):
        DataSpec(**fields)
