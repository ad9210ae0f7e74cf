"""Datasets: digits (bundled with scikit-learn), CIFAR-10, ImageNet (ImageFolder), and `folder`:
any ImageFolder of the user's own images, resized to --input-size.

Every dataset yields float32 NCHW tensors already normalized; the network's first op
quantizes them to int8 with a calibrated scale. Small datasets live in memory as tensors
(augmentation is done per batch on tensors); CIFAR-10 JPEGs and small image folders are
decoded once into a uint8 cache outside the repo (cache_dir())."""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixq import fsio
from mixq.errors import MixqError

DATASETS = ("digits", "cifar10", "imagenet", "folder")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DataError(MixqError, ValueError):
    """A missing, unreadable or unknown data set (one line naming it)."""


@dataclass
class DataSpec:
    name: str
    num_classes: int
    input_shape: tuple
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    augment: object = None          # batch-level train augmentation on tensors, or None
    workers: int = 0                # DataLoader worker processes (files decoded per item: > 0)
    classes: tuple | None = None    # class names, in label order (folder: its class folders)


def cache_dir() -> Path:
    return Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))


def load(name: str, data_dir: str | None = None, train_subset: int | None = None,
         test_subset: int | None = None, seed: int = 0, input_size=None) -> DataSpec:
    """The data set `name`. input_size: (H, W) or "H"/"HxW", for `folder` only (required there;
    the other data sets have their own fixed size and refuse one)."""
    size = input_size_for(name, input_size)
    if name == "digits":
        spec = _digits()
    elif name == "cifar10":
        spec = _cifar10(data_dir)
    elif name == "imagenet":
        spec = _imagenet(data_dir)
    elif name == "folder":
        spec = _folder(data_dir, size)
    else:
        raise DataError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    g = torch.Generator().manual_seed(seed)
    if train_subset and train_subset < len(spec.train):
        spec.train = torch.utils.data.Subset(spec.train, torch.randperm(len(spec.train), generator=g)[:train_subset].tolist())
    if test_subset and test_subset < len(spec.test):
        spec.test = torch.utils.data.Subset(spec.test, list(range(0, len(spec.test), len(spec.test) // test_subset))[:test_subset])
    return spec


def calibration_images(spec: DataSpec, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training images and labels (no augmentation): what training calibrates the
    input scale and activation clips on and hands the methods (attach_data), and what `mixq
    sensitivity` measures on; the same on every process and in every later command."""
    n = min(len(spec.train), n)
    return (torch.stack([spec.train[i][0] for i in range(n)]),
            torch.tensor([int(spec.train[i][1]) for i in range(n)]))


def check_model_fits(spec: DataSpec, input_shape, output_shape, where: str):
    """DataError (after `where`) unless a model of this input shape (C, H, W) and output shape
    (classes,) fits the data set's images and classes."""
    if tuple(spec.input_shape) != tuple(input_shape):
        raise DataError(f"{where}: model input {tuple(input_shape)} does not fit dataset '{spec.name}' "
                        f"images {tuple(spec.input_shape)}")
    if tuple(output_shape) != (spec.num_classes,):
        raise DataError(f"{where}: model output {tuple(output_shape)} does not fit dataset '{spec.name}' "
                        f"with {spec.num_classes} classes")


def model_test_split(meta: dict, input_shape, output_shape, dataset: str | None = None, data_dir=None,
                     test_subset: int | None = None, where: str = "the model") -> DataSpec:
    """The data a frozen model is checked on (mixq eval, mixq deploy): `dataset` and `data_dir`
    when given, else the ones it was trained on, as its frozen manifest's meta records them
    ("dataset", "data_dir": absolute). A folder is loaded at the model's own input size (H, W
    of input_shape, which the same deterministic resize reproduces bit for bit) and must have
    the class names the model was trained on, in the same order (meta "classes")."""
    name = dataset or meta.get("dataset") or "digits"
    recorded = meta.get("data_dir") if data_dir is None and name == meta.get("dataset") else None
    if recorded and not Path(recorded).exists():
        raise DataError(f"{where}: the training run's --data-dir {recorded} is gone (pass --data-dir)")
    spec = load(name, data_dir or recorded, test_subset=test_subset,
                input_size=tuple(input_shape[1:]) if name == "folder" else None)
    check_model_fits(spec, input_shape, output_shape, where)
    trained = meta.get("classes")
    if trained and spec.classes and tuple(trained) != tuple(spec.classes):
        differ = [f"{a} != {b}" for a, b in zip(trained, spec.classes) if a != b]
        raise DataError(f"{where}: the {name} data's classes are not the ones the model was trained on "
                        f"(label order: {', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''})")
    return spec


def test_arrays(spec: DataSpec, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split as (float32 NCHW, int64 labels) NumPy arrays, for the integer runtimes."""
    n = len(spec.test) if not limit else min(limit, len(spec.test))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(spec.test, range(n)), batch_size=512)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in loader])
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


# ----------------------------------------------------------------------------- digits
def _digits() -> DataSpec:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]          # [N,1,8,8] in [0,1]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    tds = torch.utils.data.TensorDataset
    return DataSpec("digits", 10, (1, 8, 8), tds(torch.from_numpy(xtr), torch.from_numpy(ytr)),
                    tds(torch.from_numpy(xte), torch.from_numpy(yte)))


# ----------------------------------------------------------------------------- cifar-10
def _cifar10(data_dir: str | None) -> DataSpec:
    path = _given_path(data_dir, "cifar10", "an ImageFolder dir with train/ and test/, a .tar.gz of one, "
                       "or torchvision's cifar-10-batches-py")
    xtr, ytr, xte, yte = _cifar_cached(path)
    tds = torch.utils.data.TensorDataset
    return DataSpec("cifar10", 10, (3, 32, 32), tds(normalize(xtr, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(ytr)),
                    tds(normalize(xte, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(yte)), augment=crop_flip,
                    classes=CIFAR_CLASSES)


def _given_path(data_dir: str | None, dataset: str, layout: str, directory: bool = False) -> Path:
    """--data-dir as a Path; one line when it is not given (saying what `layout` it should
    have) or does not exist (or is not a directory, if `directory`)."""
    if not data_dir:
        raise DataError(f"--data-dir is required for --dataset {dataset} ({layout})")
    path = Path(data_dir)
    if not (path.is_dir() if directory else path.exists()):
        raise DataError(f"--data-dir {data_dir}: no such {'directory' if directory else 'file or directory'}")
    return path


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW, (x / 255 - mean) / std per channel."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255 - mean) / std


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random 4-pixel-padded crop + horizontal flip, per image, on a batch tensor, on the
    batch's device (random numbers drawn there too: no host round trip on a GPU)."""
    n, _, h, w = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = _crop(xp, torch.randint(0, 2 * pad + 1, (n,), device=dev), torch.randint(0, 2 * pad + 1, (n,), device=dev), h, w)
    flip = (torch.rand(n, device=dev) < 0.5).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(3), out)


def _crop(xp, i, j, h, w):
    idx_h = i.view(-1, 1) + torch.arange(h, device=xp.device)
    idx_w = j.view(-1, 1) + torch.arange(w, device=xp.device)
    n, c = xp.shape[:2]
    out = xp.gather(2, idx_h.view(n, 1, h, 1).expand(n, c, h, xp.shape[3]))
    return out.gather(3, idx_w.view(n, 1, 1, w).expand(n, c, h, w))


def resident_tensors(ds) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of an in-memory dataset (a TensorDataset or a Subset of one), or None
    for a dataset that decodes files per item."""
    if isinstance(ds, torch.utils.data.Subset):
        inner = resident_tensors(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return inner[0][idx], inner[1][idx]
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[0], ds.tensors[1]
    return None


def _cifar_cached(path: Path):
    key = hashlib.sha256(str(path.resolve()).encode() + str(path.stat().st_mtime_ns).encode()).hexdigest()[:16]
    cache = cache_dir() / f"cifar10-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["xtr"], z["ytr"], z["xte"], z["yte"]
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        arrays = _cifar_from_tar(path)
    elif (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").exists():
        arrays = _cifar_from_batches(path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path)
    elif (path / "train").is_dir() and (path / "test").is_dir():
        arrays = _cifar_from_folder(path)
    else:
        raise DataError(f"--data-dir {path}: expected train/ and test/ class folders, a .tar.gz of "
                        "them, or cifar-10-batches-py")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(cache, DataError) as tmp, open(tmp, "wb") as f:
        np.savez(f, xtr=arrays[0], ytr=arrays[1], xte=arrays[2], yte=arrays[3])
    return arrays


def _decode(data: bytes, where: str) -> np.ndarray:
    """One CIFAR-10 image file -> uint8 HWC; one line naming the file if it is not a 32x32 image."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({type(e).__name__})") from None
    if img.shape != (32, 32, 3):
        raise DataError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, CIFAR-10 images are 32x32")
    return img


def _collect(items):
    """items: (split, class_name, key, bytes, where) -> sorted uint8 arrays per split."""
    out = {}
    for split in ("train", "test"):
        rows = sorted((c, k, d, w) for s, c, k, d, w in items if s == split)
        if not rows:
            raise DataError(f"CIFAR-10 data has no '{split}' images")
        classes = sorted({row[0] for row in rows})
        if tuple(classes) != CIFAR_CLASSES:
            raise DataError(f"CIFAR-10 '{split}' classes are {classes}, expected {list(CIFAR_CLASSES)}")
        x = np.stack([_decode(d, w) for _, _, d, w in rows])
        y = np.array([CIFAR_CLASSES.index(row[0]) for row in rows], dtype=np.int64)
        out[split] = (x, y)
    return out["train"][0], out["train"][1], out["test"][0], out["test"][1]


def _cifar_from_tar(path: Path):
    items = []
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                    continue
                items.append((parts[-3], parts[-2], parts[-1], tf.extractfile(m).read(), f"{path}:{m.name}"))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"--data-dir {path}: unreadable archive ({e})") from None
    return _collect(items)


def _cifar_from_folder(path: Path):
    items = [(s, f.parent.name, f.name, f.read_bytes(), str(f))
             for s in ("train", "test") for f in (path / s).glob("*/*") if f.is_file()]
    return _collect(items)


class _BatchUnpickler(pickle.Unpickler):
    """The cifar-10-batches-py files are pickles (a dict of bytes, lists of ints and one NumPy
    uint8 array): admit only the globals that rebuild those, so a crafted file cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")
        return super().find_class(module, name)


def _read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 NHWC images, int64 labels); one line naming the file otherwise."""
    try:
        with open(file, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
        x, y = d[b"data"], np.array(d[b"labels"], dtype=np.int64)
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32
                and y.shape == (len(x),) and ((y >= 0) & (y < 10)).all()):
            raise ValueError("expected b'data': uint8 [N, 3072] and b'labels': N labels in 0..9")
    except Exception as e:  # noqa: BLE001 - anything a damaged or foreign pickle raises
        raise DataError(f"{file}: not a CIFAR-10 python batch file ({type(e).__name__}: {str(e)[:120]})") from None
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _cifar_from_batches(path: Path):
    def read(names):
        xs, ys = zip(*[_read_batch(path / n) for n in names])
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read([f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = read(["test_batch"])
    return xtr, ytr, xte, yte


# ----------------------------------------------------------------------------- imagenet
def _imagenet(data_dir: str | None) -> DataSpec:
    if not data_dir or not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: ImageNet needs a directory with train/ and val/ ImageFolders")
    from torchvision import datasets, transforms as T
    norm = T.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())
    root = Path(data_dir)
    val = root / "val" if (root / "val").is_dir() else root / "test"
    for d in (root / "train", val):
        if not d.is_dir():
            raise DataError(f"--data-dir {data_dir}: missing {d.name}/")
    train = datasets.ImageFolder(root / "train", T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    test = datasets.ImageFolder(val, T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]))
    return DataSpec("imagenet", len(train.classes), (3, 224, 224), train, test, workers=min(8, os.cpu_count() or 1),
                    classes=tuple(train.classes))


# ----------------------------------------------------------------------------- folder
# `--dataset folder --data-dir DIR --input-size H[xW]`: the user's own images, as ImageFolder
# lays them out: DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg (or DIR/test/; val/ wins when
# both exist, as for imagenet). Class names and their order (sorted) come from train/, and
# val/test must have the same class folders. Images are read recursively below each class
# folder (as ImageFolder does), with torchvision's image extensions; other files, and hidden
# files or folders (macOS "._IMG_1.jpg" forks, ".ipynb_checkpoints/") are ignored.
#
# Geometry, train and test alike: EXIF orientation applied, converted to RGB (grayscale and
# palette images too; alpha is dropped), scaled to cover H x W keeping the aspect ratio, then
# center-cropped to H x W (PIL ImageOps.fit, bilinear). One deterministic function of (file,
# size): it is what the cache holds and what deploy reloads, bit for bit. Training adds the
# CIFAR augmentation on the batch tensors (crop_flip: a random crop of the image padded by
# 1/8 of its shorter side, 4 pixels at 32x32, and a horizontal flip), so train and test
# images differ only by that. Normalization: ImageNet's fixed mean/std, so torchvision
# weights fit via --init-from and nothing is estimated from the folder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's
# Folders whose float32 tensors (train + test, 3*H*W*4 bytes an image) fit in this many bytes
# are decoded once (cached as uint8 NHWC, a quarter of it) and held in memory as tensors: the
# training loop then gathers batches on the device (train.loop.ResidentBatches) with no
# decoding per epoch. CIFAR-10's 60,000 images at 32x32 are 0.74 GB; 2 GiB holds ~175,000
# images at 32x32 or ~3,500 at 224x224. Larger folders decode each image per item in
# DataLoader workers, as imagenet does, with the same function (the same pixels).
RESIDENT_BYTES = 2 << 30
FOLDER_CACHE_VERSION = 1       # bump when the decoding above changes: old cache files are then ignored


def input_size_for(name: str, size) -> tuple[int, int] | None:
    """The (H, W) a data set is loaded at: --input-size for `folder`, where it is required (its
    images come at any size); None for the others, which refuse one rather than ignore it
    (digits, cifar10 and imagenet have the fixed size their models are built for)."""
    if name == "folder":
        return parse_input_size(size)
    if size is not None:
        raise DataError(f"--input-size {_size_text(size)}: only --dataset folder takes an input size "
                        f"({name} images have a fixed size)")
    return None


def parse_input_size(size) -> tuple[int, int]:
    """--input-size "H" or "HxW" (or an int, or an (H, W) pair) -> (H, W); one line otherwise."""
    if size is None:
        raise DataError("--input-size H or HxW is required for --dataset folder (the size the images "
                        "are resized to, e.g. 32 or 48x64)")
    if isinstance(size, str):
        parts = size.lower().split("x")
        hw = tuple(int(p) for p in parts) if all(p.strip().isdigit() for p in parts) else ()
    elif isinstance(size, int):
        hw = (size,)
    else:               # an (H, W) pair: a checkpoint's config, a frozen model's input shape
        hw = tuple(size) if len(size) == 2 and all(isinstance(v, int) for v in size) else ()
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise DataError(f"--input-size {_size_text(size)}: expected H or HxW in pixels (positive integers, "
                        "e.g. 32 or 48x64)")
    return hw


def _size_text(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, (tuple, list)) else str(size)


def _folder(data_dir: str | None, size: tuple[int, int]) -> DataSpec:
    root = _given_path(data_dir, "folder", "a folder with train/ and val/ or test/, one subfolder of images "
                       "per class", directory=True)
    if not (root / "train").is_dir():
        raise DataError(f"--data-dir {data_dir}: no train/ folder (expected train/ and val/ or test/, "
                        "one subfolder of images per class)")
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if test_dir is None:
        raise DataError(f"--data-dir {data_dir}: no val/ or test/ folder beside train/ (the images to evaluate on)")
    classes, train_files = _folder_split(root / "train")
    test_classes, test_files = _folder_split(test_dir)
    if test_classes != classes:
        def names(c):
            return ", ".join(sorted(c)) or "none"
        raise DataError(f"--data-dir {data_dir}: train/ and {test_dir.name}/ have different class folders "
                        f"(only in train/: {names(set(classes) - set(test_classes))}; only in {test_dir.name}/: "
                        f"{names(set(test_classes) - set(classes))})")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: one class folder ({classes[0]}): a classifier needs at least 2")
    h, w = size
    resident = (len(train_files) + len(test_files)) * 3 * h * w * 4 <= RESIDENT_BYTES
    if resident:
        train, test = (torch.utils.data.TensorDataset(*_folder_cached(d, files, size))
                       for d, files in ((root / "train", train_files), (test_dir, test_files)))
    else:
        train, test = FolderImages(train_files, size), FolderImages(test_files, size)
    return DataSpec("folder", len(classes), (3, h, w), train, test,
                    augment=functools.partial(crop_flip, pad=max(1, round(min(h, w) / 8))),
                    workers=0 if resident else min(8, os.cpu_count() or 1), classes=tuple(classes))


def _folder_split(split: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, label)]) of one split, sorted; one line naming the folder
    when it has no class folders, no images, or a class folder without images."""
    classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split}: no class folders (put each class's images in a subfolder named after it)")
    found = {c: sorted(f for f in (split / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                       and not any(p.startswith(".") for p in f.relative_to(split / c).parts)) for c in classes}
    exts = ", ".join(IMAGE_EXTENSIONS)
    if not any(found.values()):
        raise DataError(f"{split}: no images in its class folders (looked for {exts})")
    empty = [c for c in classes if not found[c]]
    if empty:
        raise DataError(f"{split / empty[0]}: no images (looked for {exts})"
                        + (f"; {len(empty) - 1} more empty class folders" if len(empty) > 1 else ""))
    return classes, [(f, label) for label, c in enumerate(classes) for f in found[c]]


def _fit(file: Path, size: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 HWC, RGB, H x W (see the geometry above); one line naming the
    file when it is not a readable image."""
    from PIL import Image, ImageOps
    try:
        with Image.open(file) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA"):         # palette (with transparency): via RGBA, as PIL asks
                img = img.convert("RGBA")
            img = img.convert("RGB")
            return np.array(ImageOps.fit(img, (size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        why = type(e).__name__ + (f": {msg}" if msg and str(file) not in msg else "")   # PIL may name the file too
        raise DataError(f"{file}: not a readable image ({why})") from None


def _folder_cached(split: Path, files: list[tuple[Path, int]], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized images, labels) of one split, decoded once: the uint8 images are cached in
    cache_dir() under a key of the split's content (every image's path below the split, label,
    size and mtime, and the input size), so an added, removed, renamed or rewritten image, or
    another --input-size, decodes again, and a moved folder does not."""
    from concurrent.futures import ThreadPoolExecutor
    key = hashlib.sha256(f"{FOLDER_CACHE_VERSION} {size}".encode())
    for f, label in files:
        st = f.stat()
        key.update(f"\n{f.relative_to(split).as_posix()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    cache = cache_dir() / f"folder-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        z = np.load(cache)
        x, y = z["x"], z["y"]
    else:
        from tqdm import tqdm
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:      # PIL decodes without the GIL
            x = np.stack(list(tqdm(pool.map(lambda f: _fit(f[0], size), files), total=len(files), unit="image",
                                   desc=f"decoding {split.name}/", leave=False, disable=len(files) < 2000)))
        y = np.array([label for _, label in files], dtype=np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with fsio.atomic_path(cache, DataError) as tmp, open(tmp, "wb") as out:
            np.savez(out, x=x, y=y)
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD), torch.from_numpy(y)


class FolderImages(torch.utils.data.Dataset):
    """One split of a folder too large to hold in memory (RESIDENT_BYTES): each item decoded
    when asked (_fit, the same pixels as the cached path) and normalized."""

    def __init__(self, files: list[tuple[Path, int]], size: tuple[int, int]):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        f, label = self.files[i]
        return normalize(_fit(f, self.size)[None], IMAGENET_MEAN, IMAGENET_STD)[0], label
