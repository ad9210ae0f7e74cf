"""Datasets: digits (bundled with scikit-learn), CIFAR-10, ImageNet (ImageFolder).

Every dataset yields float32 NCHW tensors already normalized; the network's first op
quantizes them to int8 with a calibrated scale. Small datasets live in memory as tensors
(augmentation is done per batch on tensors); CIFAR-10 JPEGs are decoded once into a
uint8 cache outside the repo."""
from __future__ import annotations

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

DATASETS = ("digits", "cifar10", "imagenet")
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


def cache_dir() -> Path:
    return Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))


def load(name: str, data_dir: str | None = None, train_subset: int | None = None,
         test_subset: int | None = None, seed: int = 0) -> DataSpec:
    if name == "digits":
        spec = _digits()
    elif name == "cifar10":
        spec = _cifar10(data_dir)
    elif name == "imagenet":
        spec = _imagenet(data_dir)
    else:
        raise DataError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    g = torch.Generator().manual_seed(seed)
    if train_subset and train_subset < len(spec.train):
        spec.train = torch.utils.data.Subset(spec.train, torch.randperm(len(spec.train), generator=g)[:train_subset].tolist())
    if test_subset and test_subset < len(spec.test):
        spec.test = torch.utils.data.Subset(spec.test, list(range(0, len(spec.test), len(spec.test) // test_subset))[:test_subset])
    return spec


def check_model_fits(spec: DataSpec, input_shape, output_shape, where: str):
    """DataError (after `where`) unless a model of this input shape (C, H, W) and output shape
    (classes,) fits the data set's images and classes."""
    if tuple(spec.input_shape) != tuple(input_shape):
        raise DataError(f"{where}: model input {tuple(input_shape)} does not fit dataset '{spec.name}' "
                        f"images {tuple(spec.input_shape)}")
    if tuple(output_shape) != (spec.num_classes,):
        raise DataError(f"{where}: model output {tuple(output_shape)} does not fit dataset '{spec.name}' "
                        f"with {spec.num_classes} classes")


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
    if not data_dir:
        raise DataError("--data-dir is required for cifar10 (an ImageFolder dir with train/ and "
                        "test/, a .tar.gz of one, or torchvision's cifar-10-batches-py)")
    path = Path(data_dir)
    if not path.exists():
        raise DataError(f"--data-dir {data_dir}: no such file or directory")
    xtr, ytr, xte, yte = _cifar_cached(path)
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)

    def norm(x):
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std

    tds = torch.utils.data.TensorDataset
    return DataSpec("cifar10", 10, (3, 32, 32), tds(norm(xtr), torch.from_numpy(ytr)),
                    tds(norm(xte), torch.from_numpy(yte)), augment=crop_flip)


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
    return DataSpec("imagenet", len(train.classes), (3, 224, 224), train, test, workers=min(8, os.cpu_count() or 1))
