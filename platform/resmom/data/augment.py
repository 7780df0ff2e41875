"""Batched two-view augmentation on the training device.

FFCV decodes each image once (uint8, NCHW). The views are then made here as
batched tensor operations, each sample and each view with its own random
parameters. Working on the whole batch at once keeps the per-image Python
cost at zero and runs on the GPU when training does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from resmom.specs import AugmentSpec

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)
# RGB to YIQ (NTSC) matrix, with rows for Y, I and Q.
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(
    low: float, high: float, size: int, generator: torch.Generator, device
) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, device=device)


def _luma_weights(images: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_LUMA, device=images.device, dtype=images.dtype)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W)."""
    B, _, H, W = images.shape
    weights = _luma_weights(images).view(1, 3)
    return torch.matmul(weights, images.reshape(B, 3, H * W)).view(B, 1, H, W)


# Device types on which `_transform_selected` transforms only the selected samples.
_INDEXED_DEVICE_TYPES = ("cpu",)


def _transform_selected(
    images: torch.Tensor,
    apply: torch.Tensor,
    transform: Callable[..., torch.Tensor],
    *params: torch.Tensor,
    index_on_any_device: bool = False,
) -> torch.Tensor:
    """Return `images` with each sample where `apply` (B,) is True replaced by its transform.

    `transform(batch, *params)` receives the selected samples and the matching
    entries of each (B,) parameter, and may overwrite `batch`. This function
    may overwrite `images`, so callers pass a tensor they own.

    On the CPU only the selected samples are transformed. On other devices
    every sample is transformed and a mask keeps the selected results,
    because finding the selected indices would make the host wait for the
    device. `index_on_any_device` makes every device index the samples.
    """
    if images.device.type not in _INDEXED_DEVICE_TYPES and not index_on_any_device:
        transformed = transform(images.clone(), *params)
        return torch.where(apply.view(-1, 1, 1, 1), transformed, images)
    selected = apply.nonzero().squeeze(1)
    if len(selected) == 0:
        return images
    if len(selected) == len(images):
        return transform(images, *params)
    subset = images.index_select(0, selected)
    subset = transform(subset, *(param.index_select(0, selected) for param in params))
    return images.index_copy_(0, selected, subset)


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


@functools.cache
def _hue_rotation_parts(
    device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return 3x3 matrices A, C, S with from_yiq @ rotation(angle) @ to_yiq = A + cos C + sin S.

    rotation(angle) turns the (I, Q) plane and keeps Y.
    """
    to_yiq = torch.tensor(_TO_YIQ, dtype=torch.float64)
    from_yiq = torch.linalg.inv(to_yiq)
    fixed = torch.outer(from_yiq[:, 0], to_yiq[0])
    cos_part = torch.outer(from_yiq[:, 1], to_yiq[1]) + torch.outer(from_yiq[:, 2], to_yiq[2])
    sin_part = torch.outer(from_yiq[:, 2], to_yiq[1]) - torch.outer(from_yiq[:, 1], to_yiq[2])
    return tuple(part.to(device=device, dtype=dtype) for part in (fixed, cos_part, sin_part))


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of (B, 3, H, W) RGB images by `angle` radians (B,) in YIQ space.

    NOTE: torchvision shifts hue in HSV; a YIQ rotation is the usual batched
    approximation and differs slightly on saturated colours.
    """
    B, _, H, W = images.shape
    fixed, cos_part, sin_part = _hue_rotation_parts(images.device, images.dtype)
    cos, sin = torch.cos(angle).view(B, 1, 1), torch.sin(angle).view(B, 1, 1)
    transform = fixed + cos * cos_part + sin * sin_part  # (B, 3, 3)
    return torch.bmm(transform, images.reshape(B, 3, H * W)).view(B, 3, H, W)


def _jitter(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    angle: torch.Tensor,
) -> torch.Tensor:
    """Scale brightness, contrast and saturation by (B,) factors, then rotate the hue.

    Overwrites `images`. Each step clamps to [0, 1].
    """
    B = images.shape[0]
    images.mul_(brightness.view(B, 1, 1, 1)).clamp_(0, 1)
    # The mean luma is the luma of the channel means, because luma is linear.
    mean = (images.mean(dim=(2, 3)) @ _luma_weights(images)).view(B, 1, 1, 1)
    contrast = contrast.view(B, 1, 1, 1)
    images.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)
    saturation = saturation.view(B, 1, 1, 1)
    gray = _luma(images).mul_(1 - saturation)
    images.mul_(saturation).add_(gray).clamp_(0, 1)
    return _rotate_hue(images, angle).clamp_(0, 1)


def color_jitter(
    images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator, inplace: bool = False
) -> torch.Tensor:
    """Jitter brightness, contrast, saturation and hue, each sample with probability `jitter_p`.

    Every sample draws its factors, selected or not. `inplace` lets the
    function overwrite `images`.

    NOTE: the four steps run in a fixed order; torchvision draws a random order.
    """
    B, device = images.shape[0], images.device
    apply = torch.rand(B, generator=generator, device=device) < spec.jitter_p

    def factor(strength: float) -> torch.Tensor:
        return _uniform(max(0.0, 1 - strength), 1 + strength, B, generator, device)

    brightness = factor(spec.brightness)
    contrast = factor(spec.contrast)
    saturation = factor(spec.saturation)
    angle = _uniform(-spec.hue, spec.hue, B, generator, device) * 2 * math.pi
    out = images if inplace else images.clone()
    return _transform_selected(out, apply, _jitter, brightness, contrast, saturation, angle)


def _to_grayscale(images: torch.Tensor) -> torch.Tensor:
    return images.copy_(_luma(images).expand_as(images))


def random_grayscale(
    images: torch.Tensor, p: float, generator: torch.Generator, inplace: bool = False
) -> torch.Tensor:
    """Replace every channel of a sample by its luma, with probability `p`.

    `inplace` lets the function overwrite `images`.
    """
    B = images.shape[0]
    apply = torch.rand(B, generator=generator, device=images.device) < p
    out = images if inplace else images.clone()
    return _transform_selected(out, apply, _to_grayscale)


def blur_kernel_size(size: int, fraction: float) -> int:
    """Return the odd kernel side nearest to `fraction * size`, at least 3."""
    return max(3, round(fraction * size) // 2 * 2 + 1)


# Largest blur kernel that runs as one 2-D convolution on the CPU. For 64
# samples (torch 2.14, 2 cores) it took about 0.75 of the time of two 1-D
# passes with 3 taps at 32x32 pixels and with 7 taps at 64x64. With 9 taps
# at 80x80 both took the same time, and with 11 taps at 96x96 the 2-D
# convolution took 1.1 to 1.6 times as long.
_OUTER_PRODUCT_MAX_SIZE = 7


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample with its own standard deviation.

    Borders are reflected, as in torchvision's `gaussian_blur`. Kernels of up
    to `_OUTER_PRODUCT_MAX_SIZE` taps run on the CPU as one 2-D convolution
    with the outer product of the 1-D kernel. Larger kernels, and every
    kernel on other devices, run as two 1-D convolutions.

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
    if images.device.type == "cpu" and kernel_size <= _OUTER_PRODUCT_MAX_SIZE:
        square = kernel.view(B * C, kernel_size, 1) * kernel.view(B * C, 1, kernel_size)
        planes = F.pad(planes, (pad, pad, pad, pad), mode="reflect")
        planes = F.conv2d(planes, square.view(B * C, 1, kernel_size, kernel_size), groups=B * C)
        return planes.view(B, C, H, W)
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
    inplace: bool = False,
) -> torch.Tensor:
    """Blur each sample with probability `p` and a standard deviation drawn from `sigma_range`.

    `inplace` lets the function overwrite `images`.
    """
    B, device = images.shape[0], images.device
    apply = torch.rand(B, generator=generator, device=device) < p
    sigma = _uniform(sigma_range[0], sigma_range[1], B, generator, device)
    out = images if inplace else images.clone()
    # Only the selected samples are convolved, on every device, because
    # BYOL's second view blurs 10% of them.
    return _transform_selected(
        out,
        apply,
        functools.partial(gaussian_blur, kernel_size=kernel_size),
        sigma,
        index_on_any_device=True,
    )


def _solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    # The weight is 1 where a pixel is inverted, and lerp returns either end
    # exactly for weights of 0 and 1. torch.where with this pixel-dependent
    # mask took 4 to 9 times as long on the CPU (64x3x64x64 floats, 2 cores,
    # torch 2.14), the most on noisy images.
    inverted = torch.ge(images, threshold, out=torch.empty_like(images))
    return images.lerp_(1 - images, inverted)


def random_solarize(
    images: torch.Tensor,
    p: float,
    threshold: float,
    generator: torch.Generator,
    inplace: bool = False,
) -> torch.Tensor:
    """Invert pixels at or above `threshold` (images in [0, 1]) of a sample with probability `p`.

    `inplace` lets the function overwrite `images`.
    """
    B = images.shape[0]
    apply = torch.rand(B, generator=generator, device=images.device) < p
    out = images if inplace else images.clone()
    return _transform_selected(out, apply, functools.partial(_solarize, threshold=threshold))


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
        # The crop returns a new tensor, so the steps after it may overwrite `out`.
        out = color_jitter(out, spec, self.generator, inplace=True)
        out = random_grayscale(out, spec.grayscale_p, self.generator, inplace=True)
        out = random_gaussian_blur(
            out, spec.blur_p[index], spec.blur_sigma, self.kernel_size, self.generator,
            inplace=True,
        )  # fmt: skip
        out = random_solarize(
            out, spec.solarize_p[index], spec.solarize_threshold, self.generator, inplace=True
        )
        return out.sub_(self.mean).div_(self.std)

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
