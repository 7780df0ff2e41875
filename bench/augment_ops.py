"""Speed of each batched augmentation step against the same module at another git revision.

Loads `platform/resmom/data/augment.py` as committed at `--baseline` and as
it is in the working tree, and times each step of both on the same batches
with the same generator seeds. The two sides alternate call by call, so load
from other processes falls on both. Per step the script reports the median
time of each side and the median and interquartile range (IQR) of the
per-pair ratios baseline / current, so a ratio above 1 means the current
code is faster. Writes bench/results/augment_ops.json.

The inputs copy the setting of `bench/data_pipeline.py`: images decoded to
74x74 (64 px crops times 256/224), batch 64, BYOL's recipe with crop areas
from 8%.

Usage: python bench/augment_ops.py --baseline REV [--repeats 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from resmom.specs import AugmentSpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODULE_PATH = "platform/resmom/data/augment.py"
SPEC = AugmentSpec(crop_scale=(0.08, 1.0))


def load_module(name: str, source: str) -> ModuleType:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    module_spec = importlib.util.spec_from_file_location(name, handle.name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def git(*arguments: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *arguments], check=True, capture_output=True, text=True
    ).stdout


def synthetic_batch(batch: int, side: int, seed: int) -> torch.Tensor:
    """Return (batch, 3, side, side) uint8 images: smooth colour fields plus noise."""
    generator = torch.Generator().manual_seed(seed)
    fields = torch.rand(batch, 3, 4, 4, generator=generator) * 255
    images = F.interpolate(fields, size=(side, side), mode="bicubic", align_corners=False)
    images += torch.randint(-20, 21, images.shape, generator=generator)
    return images.clamp(0, 255).to(torch.uint8)


def step_calls(
    module: ModuleType, kernel_size: int, resolution: int
) -> dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """Return one call per step of `module`, each taking (images, generator).

    Where the module's functions accept `inplace`, the calls pass it, as
    `TwoViewAugment` does. The caller hands them a copy that they may overwrite.
    """
    takes_inplace = "inplace" in inspect.signature(module.color_jitter).parameters
    extra = {"inplace": True} if takes_inplace else {}
    return {
        "crop+flip": lambda images, generator: module.random_resized_crop_flip(
            images, resolution, SPEC.crop_scale, SPEC.flip_p, generator
        ),
        "color jitter p=0.8": lambda images, generator: module.color_jitter(
            images, SPEC, generator, **extra
        ),
        "grayscale p=0.2": lambda images, generator: module.random_grayscale(
            images, SPEC.grayscale_p, generator, **extra
        ),
        "blur p=1": lambda images, generator: module.random_gaussian_blur(
            images, 1.0, SPEC.blur_sigma, kernel_size, generator, **extra
        ),
        "blur p=0.1": lambda images, generator: module.random_gaussian_blur(
            images, 0.1, SPEC.blur_sigma, kernel_size, generator, **extra
        ),
        "solarize p=0": lambda images, generator: module.random_solarize(
            images, 0.0, SPEC.solarize_threshold, generator, **extra
        ),
        "solarize p=0.2": lambda images, generator: module.random_solarize(
            images, 0.2, SPEC.solarize_threshold, generator, **extra
        ),
    }


def timed(call: Callable[[int], object]) -> Callable[[int], float]:
    """Wrap `call(index)` into a function that returns its duration in seconds."""

    def run(index: int) -> float:
        started = time.perf_counter()
        call(index)
        return time.perf_counter() - started

    return run


def time_pairs(
    baseline: Callable[[int], float], current: Callable[[int], float], repeats: int
) -> dict[str, float]:
    """Run `baseline(i)` and `current(i)`, which return seconds, alternately.

    Returns the median time of each side and the median and IQR of the
    per-pair ratios baseline / current.
    """
    for index in range(3):  # warm-up
        baseline(index)
        current(index)
    baseline_s, current_s = [], []
    for index in range(repeats):
        # Alternate which side runs first, so neither always follows the other.
        order = ((baseline, baseline_s), (current, current_s))
        for run, times in order if index % 2 == 0 else order[::-1]:
            times.append(run(index))
    ratios = sorted(b / c for b, c in zip(baseline_s, current_s, strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "baseline_ms": statistics.median(baseline_s) * 1e3,
        "current_ms": statistics.median(current_s) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_iqr": [quartiles[0], quartiles[2]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per step and side")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64, help="crop side in pixels")
    parser.add_argument("--decoded", type=int, default=74, help="decoded image side in pixels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    baseline_commit = git("rev-parse", "--verify", f"{args.baseline}^{{commit}}").strip()
    baseline = load_module("augment_baseline", git("show", f"{baseline_commit}:{MODULE_PATH}"))
    current_module = load_module("augment_current", (ROOT / MODULE_PATH).read_text())
    kernel_size = current_module.blur_kernel_size(args.resolution, SPEC.blur_kernel_fraction)
    decoded = synthetic_batch(args.batch, args.decoded, seed=0)
    scaled = decoded.float() / 255
    crops = current_module.random_resized_crop_flip(
        scaled, args.resolution, SPEC.crop_scale, SPEC.flip_p, torch.Generator().manual_seed(0)
    )

    results = {}
    baseline_calls = step_calls(baseline, kernel_size, args.resolution)
    current_calls = step_calls(current_module, kernel_size, args.resolution)
    for name, baseline_call in baseline_calls.items():
        current_call = current_calls[name]
        source = scaled if name == "crop+flip" else crops

        def run(index, call, source=source):
            # Both sides get a copy, made before the clock starts, which an
            # in-place step may overwrite.
            images = source.clone()
            started = time.perf_counter()
            call(images, torch.Generator().manual_seed(index))
            return time.perf_counter() - started

        results[name] = time_pairs(
            functools.partial(run, call=baseline_call),
            functools.partial(run, call=current_call),
            args.repeats,
        )

    mean, std = (0.5,) * 3, (0.25,) * 3
    aspects = torch.rand(args.batch, generator=torch.Generator().manual_seed(1)) + 0.5

    def two_views(module):
        augment = module.TwoViewAugment(SPEC, args.resolution, mean, std, seed=0, device="cpu")
        return timed(lambda index: augment(decoded, aspects))

    results["two views"] = time_pairs(two_views(baseline), two_views(current_module), args.repeats)

    record = {
        "settings": vars(args),
        "baseline_commit": baseline_commit,
        "kernel_size": kernel_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average": os.getloadavg(),
        "steps": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "augment_ops.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"baseline {args.baseline} ({baseline_commit[:10]}), {args.threads} threads, "
        f"1-minute load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'step':20s} {'baseline ms':>12s} {'current ms':>11s} {'ratio':>6s}  IQR")
    for name, result in results.items():
        low, high = result["ratio_iqr"]
        print(
            f"{name:20s} {result['baseline_ms']:12.3f} {result['current_ms']:11.3f} "
            f"{result['ratio']:6.2f}  {low:.2f}-{high:.2f}"
        )


if __name__ == "__main__":
    main()
