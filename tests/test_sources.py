"""Every dataset format, written small inside the test, converted through FFCV and read back."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from polling import wait_for
from typer.testing import CliRunner

from resmom.cli import app
from resmom.data.beton import (
    ConversionOptions,
    DataError,
    OptionMismatchError,
    check_beton,
    prepare,
)
from resmom.data.loaders import eval_loader, train_loader
from resmom.data.registry import dataset_folder

CPU = torch.device("cpu")
RNG = np.random.default_rng(0)


def _random_images(count: int, side: int) -> np.ndarray:
    return RNG.integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _read_all(path: Path, **options) -> tuple[np.ndarray, np.ndarray]:
    loader = eval_loader(path, 64, rank=0, world_size=1, threads=1, device=CPU, **options)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in loader], strict=True)
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


def _stored_raw_images(path: Path) -> list[np.ndarray]:
    """Read raw-mode images straight from the file, whatever their sizes."""
    from ffcv.reader import Reader

    metadata = Reader(str(path)).metadata["f0"]
    images = []
    for row in metadata:
        count = int(row["height"]) * int(row["width"]) * 3
        pixels = np.fromfile(path, dtype=np.uint8, count=count, offset=int(row["data_ptr"]))
        images.append(pixels.reshape(int(row["height"]), int(row["width"]), 3))
    return images


def _files_left(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


# Writers of each on-disk format ------------------------------------------------


def _write_pickle(path: Path, payload: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(payload, handle, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel-major rows


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    _write_pickle(folder / "batches.meta", {"label_names": names})
    train_images, train_labels = [], []
    for batch in range(1, 6):
        images, labels = _random_images(2, 32), [batch, (batch + 3) % 10]
        _write_pickle(
            folder / f"data_batch_{batch}", {"data": _cifar_rows(images), "labels": labels}
        )
        train_images.append(images)
        train_labels.extend(labels)
    test_images = _random_images(3, 32)
    _write_pickle(folder / "test_batch", {"data": _cifar_rows(test_images), "labels": [0, 9, 4]})
    return {
        "train": (np.concatenate(train_images), np.array(train_labels)),
        "test": (test_images, np.array([0, 9, 4])),
    }


def write_cifar100(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)]})
    expected = {}
    for split, labels in (("train", [99, 0, 42, 7]), ("test", [5, 63])):
        images = _random_images(len(labels), 32)
        payload = {"data": _cifar_rows(images), "fine_labels": labels, "coarse_labels": [0] * 4}
        _write_pickle(folder / split, payload)
        expected[split] = (images, np.array(labels))
    return expected


def _stl_bytes(images: np.ndarray) -> bytes:
    return images.transpose(0, 3, 2, 1).tobytes()  # channel-major, column-major records


def write_stl10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    expected = {}
    for split, labels in (("train", [1, 10, 3]), ("test", [2, 2])):
        images = _random_images(len(labels), 96)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(images))
        (folder / f"{split}_y.bin").write_bytes(bytes(labels))
        expected[split] = (images, np.array(labels) - 1)
    unlabeled = _random_images(4, 96)
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled))
    expected["unlabeled"] = (unlabeled, np.full(4, -1))
    return expected


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A colour gradient: JPEG keeps it close, and a wrong axis order changes it."""
    base = np.random.default_rng(seed).integers(40, 200, 3)
    ramp = np.linspace(0, 50, width)[None, :, None]
    image = base[None, None, :] + ramp + np.zeros((height, 1, 1))
    return image.clip(0, 255).astype(np.uint8)


def write_imagefolder(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """Two classes in train/ and val/ with every image mode FFCV needs converted."""
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for split, folder in (("train", "train"), ("test", "val")):
        for label, name in enumerate(("ant", "bee")):
            directory = root / folder / name
            directory.mkdir(parents=True)
            seed = 10 * label + (split == "test")
            rgb = Image.fromarray(_smooth_image(40, 48, seed))
            images = {
                "rgb.jpg": rgb,
                "rgb.png": rgb,
                "gray.png": rgb.convert("L"),
                "cmyk.jpg": rgb.convert("CMYK"),
                "rgba.png": rgb.convert("RGBA"),
                "palette.png": rgb.convert("P"),
                "odd.JPEG": Image.fromarray(_smooth_image(23, 37, seed + 5)),
            }
            if split == "test":
                images = {key: images[key] for key in ("rgb.png", "odd.JPEG")}
            for filename, image in images.items():
                image.save(directory / filename, quality=95)
                files[split].append((directory / filename, label))
            (directory / "notes.txt").write_text("not an image; skipped")
    # Readers sort by class, then by path.
    for split in files:
        files[split].sort(key=lambda item: (item[1], str(item[0])))
    return files


def write_tinyimagenet(root: Path) -> dict[str, list[tuple[Path, int]]]:
    folder = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # labels follow sorted order: n01 -> 0
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for wnid in sorted(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for index in range(2):
            path = images / f"{wnid}_{index}.JPEG"
            Image.fromarray(_smooth_image(64, 64, index + len(files["train"]))).save(path)
            files["train"].append((path, sorted(wnids).index(wnid)))
    lines = []
    for index, wnid in enumerate(["n01", "n02", "n02"]):
        path = folder / "val" / "images" / f"val_{index}.JPEG"
        Image.fromarray(_smooth_image(64, 64, 100 + index)).save(path)
        lines.append(f"{path.name}\t{wnid}\t0\t0\t63\t63")
        files["test"].append((path, sorted(wnids).index(wnid)))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return files


# Round trips -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "writer"), [("cifar10", write_cifar10), ("cifar100", write_cifar100)]
)
def test_cifar_round_trip(tmp_path: Path, dataset: str, writer):
    expected = writer(tmp_path / "src")
    paths = prepare(dataset, tmp_path / "data", source=tmp_path / "src")
    for split in ("train", "test"):
        manifest = check_beton(paths[split], verify_checksum=True)
        images, labels = _read_all(paths[split])
        assert manifest["count"] == len(expected[split][1])
        assert manifest["classes"] == sorted(set(expected[split][1].tolist()))
        assert len(manifest["class_names"]) == (10 if dataset == "cifar10" else 100)
        np.testing.assert_array_equal(labels, expected[split][1])
        np.testing.assert_array_equal(images, expected[split][0])


def test_stl10_round_trip_with_unlabeled_segment(tmp_path: Path):
    expected = write_stl10(tmp_path / "src")
    paths = prepare("stl10", tmp_path / "data", source=tmp_path / "src")
    manifest = check_beton(paths["train"])
    assert manifest["count"] == 7
    assert manifest["segments"] == {"train": [0, 3], "unlabeled": [3, 7]}
    assert manifest["classes"] == [0, 2, 9]
    # Evaluation reads the labeled images only.
    images, labels = _read_all(paths["train"])
    np.testing.assert_array_equal(labels, expected["train"][1])
    np.testing.assert_array_equal(images, expected["train"][0])
    images, labels = _read_all(paths["test"])
    np.testing.assert_array_equal(images, expected["test"][0])
    # Training can read the unlabeled segment, whose labels are -1.
    loader = train_loader(paths["train"], 4, seed=0, distributed=False, threads=1, device=CPU,
                          split="unlabeled")  # fmt: skip
    batch, labels, aspects = next(iter(loader))
    assert labels.tolist() == [-1] * 4
    assert aspects.tolist() == [1.0] * 4
    stored = {image.tobytes() for image in expected["unlabeled"][0]}
    assert {image.permute(1, 2, 0).numpy().tobytes() for image in batch} == stored
    both = train_loader(paths["train"], 7, seed=0, distributed=False, threads=1, device=CPU,
                        split="train+unlabeled")  # fmt: skip
    assert sorted(next(iter(both))[1].tolist()) == [-1] * 4 + [0, 2, 9]


def test_imagefolder_raw_converts_every_mode_to_rgb(tmp_path: Path):
    files = write_imagefolder(tmp_path / "tree")
    paths = prepare("imagenet", tmp_path / "data", source=tmp_path / "tree",
                    options=ConversionOptions("raw"))  # fmt: skip
    for split in ("train", "test"):
        manifest = check_beton(paths[split])
        assert manifest["count"] == len(files[split])
        assert manifest["class_names"] == ["ant", "bee"]
        stored = _stored_raw_images(paths[split])
        for image, (path, _) in zip(stored, files[split], strict=True):
            with Image.open(path) as reference:
                np.testing.assert_array_equal(image, np.asarray(reference.convert("RGB")))
    _, labels = _read_all(paths["train"], resolution=16)
    assert labels.tolist() == [label for _, label in files["train"]]


def test_imagefolder_jpg_close_and_fixed_size(tmp_path: Path):
    files = write_imagefolder(tmp_path / "tree")
    name = f"imagefolder:{tmp_path / 'tree'}"
    paths = prepare(name, tmp_path / "data", options=ConversionOptions("jpg", 32, 95))
    assert paths["train"].parent.name == dataset_folder(name)
    manifest = check_beton(paths["train"])
    # 40x48 scaled to a longest side of 32; FFCV truncates 26.7 to 26.
    assert manifest["resolution"]["max"] == [26, 32]
    images, labels = _read_all(paths["train"], resolution=16)
    assert images.shape == (len(files["train"]), 16, 16, 3)
    assert labels.tolist() == [label for _, label in files["train"]]
    for image, (path, _) in zip(images, files["train"], strict=True):
        with Image.open(path) as reference:
            expected = np.asarray(reference.convert("RGB").resize((16, 16))).astype(float)
        # Colour means survive JPEG and resizing; the gradient direction must too.
        assert np.abs(image.astype(float).mean((0, 1)) - expected.mean((0, 1))).max() < 6
        assert image[:, -1].mean() > image[:, 0].mean()
    loader = train_loader(paths["train"], 4, seed=0, distributed=False, threads=1, device=CPU,
                          resolution=16, expected=ConversionOptions("jpg", 32, 95))  # fmt: skip
    batch, _, aspects = next(iter(loader))
    assert batch.shape == (4, 3, 19, 19)  # 16 * 256 / 224, rounded up
    # The source images are 48x40 and 37x23.
    assert set(aspects.tolist()) <= {48 / 40, 37 / 23}


def test_tinyimagenet_round_trip(tmp_path: Path):
    files = write_tinyimagenet(tmp_path / "src")
    paths = prepare("tinyimagenet", tmp_path / "data", source=tmp_path / "src")
    for split in ("train", "test"):
        images, labels = _read_all(paths[split])
        assert labels.tolist() == [label for _, label in files[split]]
        for image, (path, _) in zip(images, files[split], strict=True):
            with Image.open(path) as reference:
                np.testing.assert_array_equal(image, np.asarray(reference.convert("RGB")))
    assert check_beton(paths["train"])["class_names"] == ["n01", "n02"]


def test_imagenet100_keeps_listed_classes(tmp_path: Path):
    files = write_imagefolder(tmp_path / "tree")
    (tmp_path / "classes.txt").write_text("bee\n")
    paths = prepare("imagenet100", tmp_path / "data", source=tmp_path / "tree",
                    classes_file=tmp_path / "classes.txt")  # fmt: skip
    manifest = check_beton(paths["train"])
    assert manifest["class_names"] == ["bee"]
    assert manifest["count"] == sum(label == 1 for _, label in files["train"])


def test_fit_on_stl10_with_unlabeled_images(tmp_path: Path):
    from resmom.specs import validate_job
    from resmom.train.loop import fit

    write_stl10(tmp_path / "src")
    paths = prepare("stl10", tmp_path / "data", source=tmp_path / "src")
    spec = validate_job(
        {
            "name": "stl-unlabeled",
            "data": {"dataset": "stl10", "resolution": 16, "train_split": "train+unlabeled"},
            "model": {"width": 4},
            "method": {"projector_hidden_dim": 16, "projection_dim": 8, "predictor_hidden_dim": 16},
            "optim": {"epochs": 1, "batch_size": 4},
            "probe": {"knn_k": 2},
            "run": {"workers": 1},
        }
    )
    metrics = fit(spec, paths["train"], paths["test"], CPU)
    assert np.isfinite(metrics["loss/total"])
    assert 0 <= metrics["probe/online_top1"] <= 1
    assert 0 <= metrics["probe/knn_top1_student"] <= 1


# Bad inputs --------------------------------------------------------------------


def _assert_nothing_written(data_dir: Path) -> None:
    assert _files_left(data_dir) == []


def test_corrupt_pickle_named(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    bad = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        prepare("cifar10", tmp_path / "data", source=tmp_path / "src")
    _assert_nothing_written(tmp_path / "data")


def test_pickle_with_code_rejected(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    _write_pickle(tmp_path / "src" / "cifar-10-batches-py" / "test_batch", {"data": print})
    with pytest.raises(DataError, match="print is not allowed"):
        prepare("cifar10", tmp_path / "data", source=tmp_path / "src")


def test_cifar_wrong_shape_named(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    _write_pickle(
        tmp_path / "src" / "cifar-10-batches-py" / "test_batch",
        {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]},
    )
    with pytest.raises(DataError, match=r"test_batch: 'data' must be \(N, 3072\) uint8"):
        prepare("cifar10", tmp_path / "data", source=tmp_path / "src")


def test_truncated_stl_binary_named(tmp_path: Path):
    write_stl10(tmp_path / "src")
    unlabeled = tmp_path / "src" / "stl10_binary" / "unlabeled_X.bin"
    unlabeled.write_bytes(unlabeled.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"unlabeled_X.bin has \d+ bytes.*27648"):
        prepare("stl10", tmp_path / "data", source=tmp_path / "src")
    _assert_nothing_written(tmp_path / "data")


def test_stl_label_count_mismatch_named(tmp_path: Path):
    write_stl10(tmp_path / "src")
    (tmp_path / "src" / "stl10_binary" / "test_y.bin").write_bytes(bytes([1]))
    with pytest.raises(DataError, match="test_y.bin has 1 labels but its images file has 2"):
        prepare("stl10", tmp_path / "data", source=tmp_path / "src")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_image_named_and_nothing_written(tmp_path: Path, damage: str):
    write_imagefolder(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "bee" / "rgb.jpg"
    content = bad.read_bytes()
    bad.write_bytes(b"this is no JPEG" if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(DataError, match=r"(?s)1 of 14 images cannot be read.*bee/rgb.jpg"):
        prepare("imagenet", tmp_path / "data", source=tmp_path / "tree")
    _assert_nothing_written(tmp_path / "data")


def test_empty_class_folder_named(tmp_path: Path):
    write_imagefolder(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "wasp").mkdir()
    with pytest.raises(DataError, match="class folder .*wasp contains no images"):
        prepare("imagenet", tmp_path / "data", source=tmp_path / "tree")
    _assert_nothing_written(tmp_path / "data")


def test_missing_source_folders_named(tmp_path: Path):
    with pytest.raises(DataError, match="source folder not found"):
        prepare("cifar10", tmp_path / "data", source=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder stl10_binary not found"):
        prepare("stl10", tmp_path / "data", source=tmp_path / "empty")
    with pytest.raises(DataError, match="folder not found: .*train"):
        prepare("imagenet", tmp_path / "data", source=tmp_path / "empty")
    with pytest.raises(DataError, match="rmctl data prepare cifar100 --source PATH"):
        prepare("cifar100", tmp_path / "data")


def test_tinyimagenet_bad_annotation_named(tmp_path: Path):
    write_tinyimagenet(tmp_path / "src")
    annotations = tmp_path / "src" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_annotations.txt line 1"):
        prepare("tinyimagenet", tmp_path / "data", source=tmp_path / "src")


def test_imagenet100_missing_class_named(tmp_path: Path):
    write_imagefolder(tmp_path / "tree")
    (tmp_path / "classes.txt").write_text("bee\nwasp\n")
    with pytest.raises(DataError, match="lacks 1 listed classes: wasp"):
        prepare("imagenet100", tmp_path / "data", source=tmp_path / "tree",
                classes_file=tmp_path / "classes.txt")  # fmt: skip


# Manifests and options ---------------------------------------------------------


def test_other_options_rejected_with_name(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    paths = prepare("cifar10", tmp_path / "data", source=tmp_path / "src")
    jpg = ConversionOptions("jpg")
    with pytest.raises(OptionMismatchError, match="write_mode=raw but write_mode=jpg"):
        prepare("cifar10", tmp_path / "data", source=tmp_path / "src", options=jpg)
    with pytest.raises(OptionMismatchError, match="max_resolution=None but max_resolution=16"):
        check_beton(paths["train"], ConversionOptions("raw", 16))
    with pytest.raises(OptionMismatchError, match="write_mode"):
        eval_loader(paths["test"], 8, 0, 1, 1, CPU, expected=jpg)
    # --force rewrites with the requested options.
    prepare("cifar10", tmp_path / "data", source=tmp_path / "src", options=jpg, force=True)
    assert check_beton(paths["train"], jpg)["options"]["write_mode"] == "jpg"


def test_changed_file_rejected_as_stale(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    paths = prepare("cifar10", tmp_path / "data", source=tmp_path / "src")
    with paths["test"].open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataError, match="changed after conversion"):
        train_loader(paths["test"], 2, seed=0, distributed=False, threads=1, device=CPU)


def test_shuffle_order_reproducible_from_seed(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    path = prepare("cifar10", tmp_path / "data", source=tmp_path / "src")["train"]

    def orders(seed: int) -> list[list[int]]:
        loader = train_loader(path, 2, seed=seed, distributed=False, threads=1, device=CPU)
        return [loader.traversal_order.sample_order(epoch).tolist() for epoch in range(2)]

    assert orders(3) == orders(3)
    assert orders(3)[0] != orders(3)[1]


# Command line ------------------------------------------------------------------


def test_cli_prepare_exit_codes(tmp_path: Path):
    runner = CliRunner()
    write_cifar10(tmp_path / "src")
    data = ["--data-dir", str(tmp_path / "data")]
    result = runner.invoke(app, ["data", "prepare", "cifar10", "--source", str(tmp_path / "src"),
                                 "--workers", "1", *data])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "train:" in result.output
    unknown = runner.invoke(app, ["data", "prepare", "mnist", *data])
    assert unknown.exit_code == 2
    assert "unknown dataset 'mnist'" in unknown.output
    no_list = runner.invoke(app, ["data", "prepare", "imagenet100", "--source", "x", *data])
    assert no_list.exit_code == 2
    assert "--classes" in no_list.output
    stray_source = runner.invoke(app, ["data", "prepare", "digits", "--source", "x", *data])
    assert stray_source.exit_code == 2
    assert "digits takes no --source" in stray_source.output
    bad_quality = runner.invoke(app, ["data", "prepare", "cifar10", "--jpeg-quality", "0", *data])
    assert bad_quality.exit_code == 2
    source = ["--source", str(tmp_path / "src")]
    mismatch = runner.invoke(
        app, ["data", "prepare", "cifar10", *source, "--write-mode", "jpg", *data]
    )
    assert mismatch.exit_code == 1
    assert "write_mode=raw but write_mode=jpg" in mismatch.output


def _prepare_cli(*args: str):
    return CliRunner().invoke(app, ["data", "prepare", *args, "--workers", "1"])


def _unwrapped(output: str) -> str:
    # Rich wraps messages at the terminal width, inside long paths too.
    return output.replace("\n", "")


def test_cli_missing_source_folder(tmp_path: Path):
    data = tmp_path / "data"
    result = _prepare_cli("cifar10", "--source", str(tmp_path / "absent"), "--data-dir", str(data))
    output = _unwrapped(result.output)
    assert result.exit_code == 1
    assert f"source folder not found: {tmp_path / 'absent'}" in output
    assert "cifar-10-batches-py/" in output
    tree = _prepare_cli(f"imagefolder:{tmp_path / 'absent'}", "--data-dir", str(data))
    assert tree.exit_code == 1
    assert "train/<class>/ and val/<class>/" in _unwrapped(tree.output)
    _assert_nothing_written(data)


def test_cli_empty_class_folder(tmp_path: Path):
    write_imagefolder(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "wasp").mkdir()
    data = tmp_path / "data"
    result = _prepare_cli("imagenet", "--source", str(tmp_path / "tree"), "--data-dir", str(data))
    output = _unwrapped(result.output)
    assert result.exit_code == 1
    assert f"class folder {tmp_path / 'tree' / 'train' / 'wasp'} contains no images" in output
    assert ".jpg, .jpeg, .png" in output
    _assert_nothing_written(data)


def test_cli_corrupt_image(tmp_path: Path):
    write_imagefolder(tmp_path / "tree")
    bad = tmp_path / "tree" / "val" / "ant" / "rgb.png"
    bad.write_bytes(bad.read_bytes()[:100])
    data = tmp_path / "data"
    result = _prepare_cli("imagenet", "--source", str(tmp_path / "tree"), "--data-dir", str(data))
    output = _unwrapped(result.output)
    assert result.exit_code == 1
    assert "1 of 4 images cannot be read; fix or remove them" in output
    assert str(bad) in output
    _assert_nothing_written(data)


def test_cli_truncated_beton_without_source(tmp_path: Path):
    write_cifar10(tmp_path / "src")
    data = tmp_path / "data"
    paths = prepare("cifar10", data, source=tmp_path / "src")
    paths["train"].write_bytes(paths["train"].read_bytes()[:1000])
    before = sorted(_files_left(data))
    result = _prepare_cli("cifar10", "--data-dir", str(data))
    output = _unwrapped(result.output)
    assert result.exit_code == 1
    assert f"{paths['train']} has 1000 bytes but its manifest records" in output
    assert "rmctl data prepare cifar10 --source PATH" in output
    assert sorted(_files_left(data)) == before


def test_cli_changed_beton_converted_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_cifar10(tmp_path / "src")
    data = tmp_path / "data"
    paths = prepare("cifar10", data, source=tmp_path / "src")
    # Same size, other content: only the checksum shows the change.
    content = bytearray(paths["test"].read_bytes())
    content[-1] ^= 0xFF
    paths["test"].write_bytes(bytes(content))
    source = ["--source", str(tmp_path / "src")]
    with caplog.at_level(logging.WARNING, logger="resmom.data.beton"):
        result = _prepare_cli("cifar10", *source, "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{paths['test']} does not match the checksum in its manifest" in warnings[0]
    assert "converting cifar10 again" in warnings[0]
    for path in paths.values():
        check_beton(path, verify_checksum=True)


def test_cli_run_rejects_other_options(digits_paths: dict[str, Path], data_dir: Path):
    before = {path: path.stat().st_mtime_ns for path in _files_left(digits_paths["train"].parent)}
    job = Path(__file__).parents[1] / "jobs" / "digits_byol_rm.yaml"
    result = CliRunner().invoke(
        app, ["run", str(job), "--set", "data.write_mode=jpg", "--data-dir", str(data_dir)]
    )
    output = _unwrapped(result.output)
    assert result.exit_code == 1
    assert f"{digits_paths['train']} was written with write_mode=raw" in output
    assert "but write_mode=jpg is requested" in output
    assert "--force" in output
    after = {path: path.stat().st_mtime_ns for path in _files_left(digits_paths["train"].parent)}
    assert after == before


# Signals -----------------------------------------------------------------------


def _write_slow_imagefolder(root: Path, val_per_class: int) -> None:
    """A tree with a tiny train split and a val split that takes seconds to convert.

    Noise does not compress, so every 256x256 JPEG is large and slow to decode
    and encode. Four encoded images are written under many names.
    """
    blobs = []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(_random_images(1, 256)[0]).save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    for split, count in (("train", 2), ("val", val_per_class)):
        for name in ("ant", "bee"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                (folder / f"{index}.jpg").write_bytes(blobs[index % len(blobs)])


@pytest.mark.parametrize(
    ("signal_number", "to_group", "exit_code", "message"),
    [
        # A terminal's Ctrl+C signals the whole foreground process group.
        (signal.SIGINT, True, 130, "interrupted (SIGINT)"),
        # `kill` and most schedulers signal the process alone.
        (signal.SIGINT, False, 130, "interrupted (SIGINT)"),
        (signal.SIGTERM, False, 143, "stopped by SIGTERM"),
    ],
    ids=["sigint-to-group", "sigint-to-process", "sigterm-to-process"],
)
def test_signal_stops_conversion_cleanly(
    tmp_path: Path, signal_number: int, to_group: bool, exit_code: int, message: str
):
    import psutil

    _write_slow_imagefolder(tmp_path / "tree", val_per_class=1000)
    data = tmp_path / "data"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as error_file:
        command = subprocess.Popen(
            [
                sys.executable, "-m", "resmom.cli", "data", "prepare",
                f"imagefolder:{tmp_path / 'tree'}", "--data-dir", str(data), "--workers", "2",
            ],
            stdout=subprocess.DEVNULL, stderr=error_file, start_new_session=True,
        )  # fmt: skip
    processes: list[psutil.Process] = []
    try:
        # FFCV writes whole pages of 8 MiB, so a test split temporary file
        # above 1 MiB means the workers are converting the val images, after
        # the train split was finished.
        def converting_test_split() -> bool:
            if command.poll() is not None:
                raise AssertionError(f"rmctl ended before the signal:\n{stderr.read_text()}")
            return any(path.stat().st_size > 1 << 20 for path in data.rglob(".test.beton.*.tmp"))

        wait_for(converting_test_split, 300, "the conversion of the test split", every_s=0.05)
        assert any(data.rglob("train.beton.manifest.json"))
        processes = psutil.Process(command.pid).children(recursive=True)
        assert len(processes) >= 3  # the writer process and its 2 FFCV workers at least

        if to_group:
            os.killpg(command.pid, signal_number)
        else:
            command.send_signal(signal_number)
        sent = time.monotonic()
        returncode = command.wait(timeout=60)
        elapsed = time.monotonic() - sent
        output = _unwrapped(stderr.read_text())

        assert returncode == exit_code, output[-3000:]
        # Measured at about 1.2 s on a shared 2-core machine; the bound leaves room for load.
        assert elapsed < 10, f"took {elapsed:.1f} s to stop"
        assert f"conversion of imagefolder:{tmp_path / 'tree'} {message}" in output
        assert "Traceback" not in output
        assert "leaked shared_memory" not in output
        _, alive = psutil.wait_procs(processes, timeout=5)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
        _assert_nothing_written(data)
    finally:
        # Leave nothing running if an assertion failed first. Neither Popen nor
        # psutil signals a process id that a new process may have taken.
        command.kill()
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        command.wait()
        shutil.rmtree(tmp_path / "tree")  # 120 MB of images


def _limit_file_size() -> None:
    # FFCV writes the first page of samples at 8 MiB into the file, so a 4 MiB
    # limit fails the first write after the header, as a full disk would.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))


# TODO: this conversion hung past 120 s in 1 of 3 full-suite runs: the
# watchdog that notices a failed FFCV worker missed it at least once. Until
# that race is found, the test runs only with `make test-all`.
@pytest.mark.slow
def test_full_disk_during_conversion_named(tmp_path: Path):
    _write_slow_imagefolder(tmp_path / "tree", val_per_class=20)
    data = tmp_path / "data"
    name = f"imagefolder:{tmp_path / 'tree'}"
    command = subprocess.Popen(
        [
            sys.executable, "-m", "resmom.cli", "data", "prepare", name,
            "--data-dir", str(data), "--workers", "2",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_limit_file_size, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = command.communicate(timeout=120)
    finally:
        # Without a group kill, FFCV's processes would outlive a timed-out run.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)
        command.wait()
    output = _unwrapped(stderr)
    assert command.returncode == 1, output[-3000:]
    assert f"failed to write {data / dataset_folder(name) / 'train.beton'}" in output
    assert "an FFCV worker process ended with exit code 1" in output
    assert "OSError: [Errno 27] File too large" in output
    assert "ulimit -f" in output
    _assert_nothing_written(data)


# Shards under DDP ----------------------------------------------------------------


def _shard_worker(rank: int, world: int, port: int, path: str, results) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        orders = []
        for _ in range(2):  # two loaders with the same seed must agree
            loader = train_loader(Path(path), 2, seed=5, distributed=True, threads=1,
                                  device=CPU, split="unlabeled")  # fmt: skip
            orders.append([loader.traversal_order.sample_order(e).tolist() for e in range(2)])
        results[rank] = orders
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 20 s: two processes import torch and FFCV
def test_ddp_ranks_read_own_shards(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    write_stl10(tmp_path / "src")
    path = prepare("stl10", tmp_path / "data", source=tmp_path / "src")["train"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_shard_worker, args=(2, port, str(path), results), nprocs=2, join=True)
        results = dict(results)
    first, rerun = results[0]
    assert first == rerun
    assert results[1][0] == results[1][1]
    for epoch in range(2):
        shards = [set(results[rank][0][epoch]) for rank in range(2)]
        # The unlabeled segment is samples 3..6; the two ranks split it.
        assert shards[0] | shards[1] == {3, 4, 5, 6}
        assert not shards[0] & shards[1]
    # The order changes with the epoch (fixed by seed 5, so this check is deterministic).
    assert results[0][0][0] != results[0][0][1] or results[1][0][0] != results[1][0][1]
