"""Batched two-view augmentation on the training device.

FFCV decodes each image once (uint8, NCHW). The views are then made here as
batched tensor operations, each sample and each view with its own random
parameters. Working on the whole batch at once keeps the per-image Python
cost at zero and runs on the GPU when training does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from resmom.specs import AugmentSpec

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(
    low: float, high: float, size: int, generator: torch.Generator, device
) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, device=device)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W)."""
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def crop_sides(
    area: torch.Tensor, aspect: torch.Tensor, source_aspect: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return crop width and height as fractions of the image's width and height.

    Args:
        area: (B,) crop area as a fraction of the original image's area.
        aspect: (B,) crop width over height, in the original image's pixels.
        source_aspect: (B,) width over height of the original image, which may
            have been resized into the square it is cropped from; None: 1.
    """
    relative = aspect if source_aspect is None else aspect / source_aspect.to(aspect.dtype)
    width = torch.sqrt(area * relative).clamp(max=1.0)
    height = torch.sqrt(area / relative).clamp(max=1.0)
    return width, height


def random_resized_crop_flip(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    flip_p: float,
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    source_aspect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop a random area and aspect ratio per sample, flip, and resize to `size`.

    NOTE: torchvision resamples a crop that does not fit inside the image, up
    to 10 tries and then a center crop. Here the sides are clipped to the
    image instead, which slightly favours square crops at large scales.

    Args:
        images: (B, C, H, W) float.
        source_aspect: (B,) width over height of each original image. Area
            and aspect ratio are drawn in its pixels even when the decoder
            squashed it into (H, W).
    Returns:
        (B, C, size, size) float.
    """
    B, device = images.shape[0], images.device
    area = _uniform(scale[0], scale[1], B, generator, device)
    log_ratio = _uniform(math.log(ratio[0]), math.log(ratio[1]), B, generator, device)
    # Sides as fractions of the image side; affine_grid spans [-1, 1].
    width, height = crop_sides(area, torch.exp(log_ratio), source_aspect)
    center_x = (1 - width) * _uniform(-1, 1, B, generator, device)
    center_y = (1 - height) * _uniform(-1, 1, B, generator, device)
    flip = torch.where(torch.rand(B, generator=generator, device=device) < flip_p, -1.0, 1.0)

    # The grid that F.affine_grid would make from the rows (width * flip, 0,
    # center_x) and (0, height, center_y). Broadcasting builds it about 8 times
    # faster on the CPU, where affine_grid took as long as the sampling itself.
    # Output pixel i sits at (2i + 1) / size - 1, as with align_corners=False.
    pixel_centers = (torch.arange(size, device=device, dtype=images.dtype) * 2 + 1) / size - 1
    grid_x = (width * flip).view(B, 1, 1) * pixel_centers.view(1, 1, size)
    grid_y = height.view(B, 1, 1) * pixel_centers.view(1, size, 1)
    grid = torch.stack(
        (
            (grid_x + center_x.view(B, 1, 1)).expand(B, size, size),
            (grid_y + center_y.view(B, 1, 1)).expand(B, size, size),
        ),
        dim=-1,
    )
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of (B, 3, H, W) RGB images by `angle` radians (B,) in YIQ space.

    NOTE: torchvision shifts hue in HSV; a YIQ rotation is the usual batched
    approximation and differs slightly on saturated colours.
    """
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=images.device,
        dtype=images.dtype,
    )
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(images.shape[0], 3, 3, device=images.device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = from_yiq @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", transform, images)


def color_jitter(
    images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator
) -> torch.Tensor:
    """Jitter brightness, contrast, saturation and hue, each sample with probability `jitter_p`.

    NOTE: the four steps run in a fixed order; torchvision draws a random order.
    """
    B, device = images.shape[0], images.device
    apply = (torch.rand(B, generator=generator, device=device) < spec.jitter_p).view(B, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        return _uniform(max(0.0, 1 - strength), 1 + strength, B, generator, device).view(B, 1, 1, 1)

    out = (images * factor(spec.brightness)).clamp(0, 1)
    mean = _luma(out).mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * factor(spec.contrast) + mean).clamp(0, 1)
    gray = _luma(out)
    out = ((out - gray) * factor(spec.saturation) + gray).clamp(0, 1)
    angle = _uniform(-spec.hue, spec.hue, B, generator, device) * 2 * math.pi
    out = _rotate_hue(out, angle).clamp(0, 1)
    return torch.where(apply, out, images)


def random_grayscale(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    B = images.shape[0]
    apply = (torch.rand(B, generator=generator, device=images.device) < p).view(B, 1, 1, 1)
    return torch.where(apply, _luma(images).expand_as(images), images)


def blur_kernel_size(size: int, fraction: float) -> int:
    """Return the odd kernel side nearest to `fraction * size`, at least 3."""
    return max(3, round(fraction * size) // 2 * 2 + 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample with its own standard deviation, as two 1-D convolutions.

    Borders are reflected, as in torchvision's `gaussian_blur`.

    Args:
        images: (B, C, H, W) float.
        sigma: (B,) standard deviations in pixels.
    Returns:
        (B, C, H, W) float.
    """
    B, C, H, W = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    kernel = kernel.repeat_interleave(C, dim=0)  # (B*C, K): one filter per sample and channel
    pad = kernel_size // 2
    # Grouped convolution: every (sample, channel) plane is its own group.
    planes = images.reshape(1, B * C, H, W)
    planes = F.pad(planes, (pad, pad, 0, 0), mode="reflect")
    planes = F.conv2d(planes, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    planes = F.pad(planes, (0, 0, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return planes.view(B, C, H, W)


def random_gaussian_blur(
    images: torch.Tensor,
    p: float,
    sigma_range: tuple[float, float],
    kernel_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Blur each sample with probability `p` and a standard deviation drawn from `sigma_range`."""
    B, device = images.shape[0], images.device
    apply = torch.rand(B, generator=generator, device=device) < p
    sigma = _uniform(sigma_range[0], sigma_range[1], B, generator, device)
    if not apply.any():
        return images
    # Only the selected samples are convolved; BYOL's second view blurs 10% of them.
    selected = apply.nonzero().squeeze(1)
    out = images.clone()
    out[selected] = gaussian_blur(images[selected], sigma[selected], kernel_size)
    return out


def random_solarize(
    images: torch.Tensor, p: float, threshold: float, generator: torch.Generator
) -> torch.Tensor:
    """Invert pixels at or above `threshold` (images in [0, 1]) of a sample with probability `p`."""
    B = images.shape[0]
    apply = (torch.rand(B, generator=generator, device=images.device) < p).view(B, 1, 1, 1)
    solarized = torch.where(images >= threshold, 1 - images, images)
    return torch.where(apply, solarized, images)


class TwoViewAugment:
    """Turn a decoded uint8 batch into two independently augmented, normalized views."""

    def __init__(
        self,
        spec: AugmentSpec,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.size = size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.kernel_size = blur_kernel_size(size, spec.blur_kernel_fraction)

    def view(
        self, images: torch.Tensor, index: int, source_aspect: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Make view `index` (0 or 1) of (B, 3, H, W) images in [0, 1], in BYOL's order."""
        spec = self.spec
        out = random_resized_crop_flip(
            images, self.size, spec.crop_scale, spec.flip_p, self.generator,
            source_aspect=source_aspect,
        )  # fmt: skip
        out = color_jitter(out, spec, self.generator)
        out = random_grayscale(out, spec.grayscale_p, self.generator)
        out = random_gaussian_blur(
            out, spec.blur_p[index], spec.blur_sigma, self.kernel_size, self.generator
        )
        out = random_solarize(out, spec.solarize_p[index], spec.solarize_threshold, self.generator)
        return (out - self.mean) / self.std

    def __call__(
        self, images: torch.Tensor, source_aspect: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 and optional (B,) original aspect ratios -> two float views.

        Each view is (B, 3, size, size).
        """
        scaled = images.float().div_(255)
        return self.view(scaled, 0, source_aspect), self.view(scaled, 1, source_aspect)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> normalized float, for evaluation."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s
