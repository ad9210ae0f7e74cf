"""Datasets: bundled digits, CIFAR-10 from an ImageFolder tree / tar.gz (decoded once into a
uint8 cache), the batch augmentation, and one-line errors for bad data locations."""
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mixq import data

from conftest import CIFAR, needs_cifar


def test_digits_is_a_fixed_stratified_split_in_unit_range():
    a, b = data.load("digits"), data.load("digits")
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert len(a.train) == 1437 and len(a.test) == 360
    x, y = a.train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) == 1.0
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35                         # stratified: every class ~36 times


def test_subsets_are_seeded_and_sized():
    s = data.load("digits", train_subset=100, test_subset=50, seed=3)
    assert len(s.train) == 100 and len(s.test) == 50
    again = data.load("digits", train_subset=100, seed=3)
    other = data.load("digits", train_subset=100, seed=4)
    assert s.train.indices == again.train.indices != other.train.indices
    x, y = data.test_arrays(s)
    assert x.shape == (50, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64


def test_crop_flip_keeps_shape_and_pixels():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = data.crop_flip(x, pad=2)
    assert out.shape == x.shape
    for i in range(2):                      # every output pixel is an input pixel or padding (0)
        vals = set(out[i].flatten().tolist()) - {0.0}
        assert vals <= set(x[i].flatten().tolist())
    # zero padding crop: no flip, offset (pad, pad) is the identity
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(data._crop(xp, torch.tensor([2, 2]), torch.tensor([2, 2]), 8, 8), x)


def _tiny_cifar(root: Path, per_class: int = 2):
    """A CIFAR-10-shaped ImageFolder tree of PNGs (lossless), with known pixel values."""
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = {}
    for split in ("train", "test"):
        for c in data.CIFAR_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i:04d}.png")
                pixels[(split, c, i)] = img
    return pixels


def test_cifar_from_folder_and_tar_decodes_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    pixels = _tiny_cifar(tmp_path / "cifar")
    spec = data.load("cifar10", str(tmp_path / "cifar"))
    assert spec.num_classes == 10 and spec.input_shape == (3, 32, 32) and spec.augment is data.crop_flip
    assert len(spec.train) == 20 and len(spec.test) == 20
    # labels follow the class order; pixels round-trip through the normalization
    x, y = spec.test.tensors
    assert y.tolist() == [i // 2 for i in range(20)]
    img = (x[3].permute(1, 2, 0).numpy() * data.CIFAR_STD + data.CIFAR_MEAN) * 255
    assert np.abs(img - pixels[("test", data.CIFAR_CLASSES[1], 1)]).max() < 1e-3
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1
    # the same images from a tar.gz
    tar = tmp_path / "c.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tmp_path / "cifar", arcname="cifar10")
    spec2 = data.load("cifar10", str(tar))
    assert torch.equal(spec2.test.tensors[0], x) and torch.equal(spec2.train.tensors[1], spec.train.tensors[1])
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_bad_data_locations_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match="unknown dataset 'mnist'"):
        data.load("mnist")
    with pytest.raises(data.DataError, match="--data-dir is required"):
        data.load("cifar10")
    with pytest.raises(data.DataError, match="nowhere: no such file"):
        data.load("cifar10", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="expected train/ and test/"):
        data.load("cifar10", str(tmp_path / "empty"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.DataError, match="bad.tar.gz: unreadable archive"):
        data.load("cifar10", str(bad))
    with pytest.raises(data.DataError, match="ImageNet needs a directory"):
        data.load("imagenet", str(tmp_path / "nowhere"))


@needs_cifar
@pytest.mark.slow
def test_real_cifar10_decodes_in_reasonable_time(tmp_path, monkeypatch):
    """First decode of the 60,000 JPEGs into a fresh cache, then the cached load."""
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path))
    t0 = time.time()
    spec = data.load("cifar10", str(CIFAR))
    first = time.time() - t0
    t0 = time.time()
    data.load("cifar10", str(CIFAR))
    cached = time.time() - t0
    print(f"CIFAR-10 first decode {first:.1f} s, cached load {cached:.1f} s")
    assert len(spec.train) == 50000 and len(spec.test) == 10000
    assert torch.bincount(spec.test.tensors[1]).tolist() == [1000] * 10
    assert first < 300 and cached < 30


def _batches_dir(root: Path, protocol: int) -> dict:
    """A cifar-10-batches-py directory of tiny batches, pickled as the real files are (a dict of
    bytes keys, a uint8 [N, 3072] array, a list of labels)."""
    import pickle
    rng = np.random.default_rng(protocol)
    root.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, 3)],
             b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * 3}
        (root / name).write_bytes(pickle.dumps(d, protocol=protocol))
        batches[name] = d
    return batches


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_batches_load_without_running_pickled_code(tmp_path, monkeypatch):
    import pickle
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    for protocol in (2, 4, 5):
        root = tmp_path / f"p{protocol}" / "cifar-10-batches-py"
        batches = _batches_dir(root, protocol)
        spec = data.load("cifar10", str(root.parent))
        assert spec.test.tensors[1].tolist() == batches["test_batch"][b"labels"]
        img = (spec.test.tensors[0][2].permute(1, 2, 0).numpy() * data.CIFAR_STD + data.CIFAR_MEAN) * 255
        assert np.abs(img - batches["test_batch"][b"data"][2].reshape(3, 32, 32).transpose(1, 2, 0)).max() < 1e-3
    # a crafted data_batch_1 is refused before its payload runs; random bytes are one line too
    root = tmp_path / "evil" / "cifar-10-batches-py"
    _batches_dir(root, 4)
    marker = tmp_path / "payload-ran"
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": []}))
    with pytest.raises(data.DataError, match=r"data_batch_1: not a CIFAR-10 python batch file.*pathlib"):
        data.load("cifar10", str(root))
    assert not marker.exists()
    (root / "data_batch_1").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(data.DataError, match="data_batch_1: not a CIFAR-10 python batch file"):
        data.load("cifar10", str(root))
    _batches_dir(tmp_path / "missing", 4)
    (tmp_path / "missing" / "test_batch").unlink()
    with pytest.raises(data.DataError, match="test_batch: not a CIFAR-10 python batch file"):
        data.load("cifar10", str(tmp_path / "missing"))


def test_cifar_image_sizes_are_checked_while_loading(tmp_path, monkeypatch, capsys):
    """16x16 images (or a mix of sizes) are named with the expected size as they are decoded,
    before any run directory exists, not after a training run fails inside torch."""
    from PIL import Image

    from mixq import cli
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "small"
    _tiny_cifar(root, per_class=1)
    for f in sorted(root.glob("*/*/*.png")):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(f)
    first = root / "train" / data.CIFAR_CLASSES[0] / "0000.png"
    with pytest.raises(data.DataError, match=rf"{first}: image is 16x16, CIFAR-10 images are 32x32"):
        data.load("cifar10", str(root))
    mixed = tmp_path / "mixed"
    _tiny_cifar(mixed, per_class=1)
    odd = mixed / "train" / "dog" / "0000.png"
    Image.fromarray(np.zeros((40, 32, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(data.DataError, match=rf"{odd}: image is 32x40, CIFAR-10 images are 32x32"):
        data.load("cifar10", str(mixed))
    tar = tmp_path / "mixed.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(mixed, arcname="cifar10")
    with pytest.raises(data.DataError, match=r"mixed.tar.gz:cifar10/train/dog/0000.png: image is 32x40"):
        data.load("cifar10", str(tar))
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(["train", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(root),
                     "--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{first}: image is 16x16" in err, err
    assert not run.exists()
