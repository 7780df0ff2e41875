"""Two-view loading throughput: our FFCV + batched pipeline against torchvision's DataLoader.

Both sides read the same synthetic JPEG images (written once into a
temporary ImageFolder tree), make two BYOL views per image with the same
recipe, and use the same number of workers:

- ours: the tree converted once into a JPEG `.beton`; FFCV decodes each
  image once with `workers` threads, then `TwoViewAugment` makes both views
  as batched tensor operations in the main process (CPU here);
- peer: `torchvision.datasets.ImageFolder` with PIL transforms
  (RandomResizedCrop, flip, ColorJitter p=0.8, Grayscale p=0.2,
  GaussianBlur, Solarize, ToTensor, Normalize) applied twice per image in
  `workers` DataLoader processes.

The first epoch of each side is a warm-up, because FFCV compiles its
pipeline with numba and DataLoader starts its processes. The table reports
the median images/s of the timed epochs. Also reported: FFCV decoding alone, the
augmentation alone, and the conversion time split into the pre-pass that
decodes every image and the writing. Writes JSON and Markdown under
bench/results/.

Usage: python bench/data_pipeline.py [--images 512] [--workers 2] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resmom.data.augment import TwoViewAugment, blur_kernel_size
from resmom.data.beton import ConversionOptions, beton_path, check_beton, write_beton
from resmom.data.loaders import train_loader
from resmom.data.registry import dataset_info
from resmom.data.sources import check_source, read_imagefolder
from resmom.specs import AugmentSpec

RESULTS = Path(__file__).parent / "results"
# BYOL's recipe (arXiv 2006.07733, Table 6), crop area from 8%.
SPEC = AugmentSpec(crop_scale=(0.08, 1.0))


def write_tree(root: Path, count: int, seed: int = 0) -> None:
    """Write `count` JPEG images of 64-96 pixels a side into root/train and a few into root/val."""
    rng = np.random.default_rng(seed)
    for split, number in (("train", count), ("val", 20)):
        for index in range(number):
            label = index % 10
            height, width = rng.integers(64, 97, 2)
            # Smooth colour fields plus noise, so that JPEG sizes are realistic.
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((int(width), int(height)), Image.BICUBIC)
            pixels = np.asarray(image).astype(np.int16) + rng.integers(
                -20, 21, image.size[::-1] + (3,)
            )
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                folder / f"{index:05d}.jpg", quality=90
            )


def convert(root: Path, data_dir: Path, workers: int) -> tuple[Path, dict[str, float]]:
    source = read_imagefolder(root)["train"]
    started = time.perf_counter()
    check_source(source, workers, "benchmark images")
    checked = time.perf_counter()
    path = beton_path(data_dir, "bench", "train")
    write_beton(path, source, ConversionOptions("jpg", 96, 90), workers)
    written = time.perf_counter()
    return path, {"check_s": checked - started, "write_s": written - checked}


def _median_rate(run_epoch, epochs: int) -> tuple[float, list[float]]:
    run_epoch()  # warm-up
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        images = run_epoch()
        rates.append(images / (time.perf_counter() - started))
    return statistics.median(rates), rates


def measure_ours(path: Path, args: argparse.Namespace, torch_threads: int) -> dict[str, float]:
    """Time FFCV decoding plus batched views, with `torch_threads` for the tensor operations.

    FFCV sets torch's thread count to its own thread count whenever an
    epoch starts, so the count for the augmentation is set again after that.
    """
    cpu = torch.device("cpu")
    info = dataset_info("imagefolder:bench")
    loader = train_loader(
        path, args.batch, seed=0, distributed=False, threads=args.workers, device=cpu,
        resolution=args.resolution, expected=ConversionOptions("jpg", 96, 90),
    )  # fmt: skip
    augment = TwoViewAugment(SPEC, args.resolution, info.mean, info.std, seed=0, device=cpu)

    def epoch():
        batches = iter(loader)
        torch.set_num_threads(torch_threads)
        return batches

    def two_views() -> int:
        count = 0
        for images, _, aspects in epoch():
            view_a, view_b = augment(images, aspects)
            count += len(view_a)
        return count

    def decode_only() -> int:
        return sum(len(images) for images, _, _ in epoch())

    batch, _, batch_aspects = next(epoch())

    def augment_only() -> int:
        for _ in range(len(loader)):
            augment(batch, batch_aspects)
        return len(loader) * args.batch

    rate, rates = _median_rate(two_views, args.epochs)
    decode_rate, _ = _median_rate(decode_only, args.epochs)
    augment_rate, _ = _median_rate(augment_only, args.epochs)
    return {
        "torch_threads": torch_threads,
        "img_per_s": rate,
        "img_per_s_runs": rates,
        "decode_only_img_per_s": decode_rate,
        "augment_only_img_per_s": augment_rate,
        "decoded_side": int(batch.shape[-1]),
    }


class _TwoViews:
    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __call__(self, image):
        return self.first(image), self.second(image)


def peer_transforms(resolution: int, view: int):
    from torchvision import transforms

    info = dataset_info("imagefolder:bench")
    kernel = blur_kernel_size(resolution, SPEC.blur_kernel_fraction)
    jitter = transforms.ColorJitter(SPEC.brightness, SPEC.contrast, SPEC.saturation, SPEC.hue)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(resolution, scale=SPEC.crop_scale),
            transforms.RandomHorizontalFlip(SPEC.flip_p),
            transforms.RandomApply([jitter], p=SPEC.jitter_p),
            transforms.RandomGrayscale(SPEC.grayscale_p),
            transforms.RandomApply(
                [transforms.GaussianBlur(kernel, SPEC.blur_sigma)], p=SPEC.blur_p[view]
            ),
            transforms.RandomSolarize(round(255 * SPEC.solarize_threshold), SPEC.solarize_p[view]),
            transforms.ToTensor(),
            transforms.Normalize(info.mean, info.std),
        ]
    )


def measure_peer(root: Path, args: argparse.Namespace) -> dict[str, float]:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    transform = _TwoViews(peer_transforms(args.resolution, 0), peer_transforms(args.resolution, 1))
    dataset = ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(
        dataset, batch_size=args.batch, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=True,
    )  # fmt: skip

    def two_views() -> int:
        return sum(len(view_a) for (view_a, _), _ in loader)

    rate, rates = _median_rate(two_views, args.epochs)
    return {"img_per_s": rate, "img_per_s_runs": rates}


def write_results(record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    ours, ours_single, peer = record["ours"], record["ours_one_torch_thread"], record["peer"]
    settings = record["settings"]
    workers = settings["workers"]
    lines = [
        "# Two-view loading: FFCV + batched augmentation vs torchvision DataLoader + PIL",
        "",
        f"{settings['images']} JPEG images of 64-96 px, two {settings['resolution']}x"
        f"{settings['resolution']} BYOL views each, batch {settings['batch']}, "
        f"{workers} workers on both sides, median of {settings['epochs']} epochs after a "
        f"warm-up epoch; {record['machine']}. Command: `python bench/data_pipeline.py`.",
        "",
        "| pipeline | images/s |",
        "| --- | --- |",
        f"| ours: FFCV decode ({workers} threads) + batched two views (CPU, {workers} torch "
        "threads, as training sets them for a worker of that many CPUs) "
        f"| {ours['img_per_s']:.0f} |",
        f"| torchvision DataLoader ({workers} processes) + PIL transforms "
        f"| {peer['img_per_s']:.0f} |",
        f"| **ratio** | **{record['ratio']:.2f}x** |",
        f"| ours, FFCV decode only | {ours['decode_only_img_per_s']:.0f} |",
        f"| ours, batched two views only | {ours['augment_only_img_per_s']:.0f} |",
        f"| ours with 1 torch thread for the views | {ours_single['img_per_s']:.0f} |",
        "",
        f"Conversion of the {settings['images']} images: pre-pass decoding every image "
        f"{record['conversion']['check_s']:.2f} s, writing the `.beton` "
        f"{record['conversion']['write_s']:.2f} s.",
        "",
    ]
    (RESULTS / "data_pipeline.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "tree"
        write_tree(root, args.images)
        path, conversion = convert(root, Path(folder) / "data", args.workers)
        check_beton(path)
        # The peer runs first: its processes fork before FFCV starts any threads.
        peer = measure_peer(root, args)
        ours = measure_ours(path, args, torch_threads=args.workers)
        ours_single = measure_ours(path, args, torch_threads=1)

    record = {
        "settings": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "ours": ours,
        "ours_one_torch_thread": ours_single,
        "peer": peer,
        "ratio": ours["img_per_s"] / peer["img_per_s"],
        "conversion": conversion,
    }
    record["ratios"] = [
        {
            "name": "two-view loading, ours / torchvision DataLoader (images/s)",
            "value": record["ratio"],
            "target": ">= 3",
        }
    ]
    write_results(record)
    print(f"ours (FFCV + batched two views): {ours['img_per_s']:.0f} images/s")
    print(f"torchvision DataLoader + PIL:    {peer['img_per_s']:.0f} images/s")
    print(f"ratio: {record['ratio']:.2f}x (target: at least 3x)")


if __name__ == "__main__":
    main()
