"""`--dataset folder`: the user's own ImageFolder (train/ and val/ or test/, a subfolder per
class, images of any size and mode), resized to --input-size, decoded once into a cache; its
one-line errors; and a folder-trained model through freeze, compile and deploy, bit-exact."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mixq import data

CLASSES = ("one", "two", "zero")       # sorted: the label order
DIGIT = {"zero": 0, "one": 1, "two": 2}
TINT = {"zero": (255, 80, 80), "one": (80, 255, 80), "two": (80, 80, 255)}


def make_folder(root: Path, train: int = 4, test: int = 2, test_name: str = "val", classes=CLASSES) -> Path:
    """scikit-learn digits 0, 1, 2 upscaled to assorted sizes and tinted per class: PNGs and
    JPEGs, RGB and grayscale, with a stray text file and a hidden folder that are not images."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    for split, n in (("train", train), (test_name, test)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            pool = np.flatnonzero(digits.target == DIGIT.get(c, 0))
            for i in range(n):
                gray = (digits.images[pool[rng.integers(len(pool))]] * 255 / 16).astype(np.uint8)
                h, w = (int(v) for v in rng.integers(12, 48, 2))
                img = Image.fromarray(gray).resize((w, h), Image.Resampling.NEAREST)
                if i % 3 != 2:         # every third image stays grayscale
                    rgb = np.asarray(img, dtype=np.float32)[..., None] * np.array(TINT.get(c, (255, 255, 255))) / 255
                    img = Image.fromarray(rgb.astype(np.uint8))
                img.save(root / split / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    (root / "train" / classes[0] / "._000.png").write_bytes(b"a macOS fork, hidden")
    (root / "train" / classes[0] / ".thumbs").mkdir()
    (root / "train" / classes[0] / ".thumbs" / "x.png").write_bytes(b"not read")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_folder_loads_at_the_input_size_with_its_classes_and_imagenet_normalization(tmp_path, cache):
    from PIL import Image
    root = make_folder(tmp_path / "imgs")
    exact = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(exact).save(root / "val" / "two" / "exact.png")          # already 16x24: kept as is
    spec = data.load("folder", str(root), input_size="16x24")
    assert spec.name == "folder" and spec.classes == CLASSES and spec.num_classes == 3
    assert spec.input_shape == (3, 16, 24) and spec.workers == 0
    assert spec.augment.func is data.crop_flip and spec.augment.keywords == {"pad": 2}     # 16 / 8
    x, y = spec.train.tensors
    assert x.shape == (12, 3, 16, 24) and x.dtype == torch.float32
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4              # sorted class folders, sorted files
    xt, yt = spec.test.tensors
    assert len(yt) == 7 and yt.tolist() == [0, 0, 1, 1, 1, 2, 2]  # "exact.png" sorts after 000, 001
    pixels = (xt[4].permute(1, 2, 0).numpy() * data.IMAGENET_STD + data.IMAGENET_MEAN) * 255
    assert np.abs(pixels - exact).max() < 1e-3
    gray = (x[2].permute(1, 2, 0).numpy() * data.IMAGENET_STD + data.IMAGENET_MEAN) * 255   # 002.png: grayscale
    assert np.abs(gray - gray[..., :1]).max() < 1e-3 and gray.max() > 200
    # a square size from "H"; the test split may be test/
    other = make_folder(tmp_path / "other", test_name="test")
    assert data.load("folder", str(other), input_size="12").input_shape == (3, 12, 12)
    x, _ = data.test_arrays(data.load("folder", str(other), input_size=12))
    assert x.shape == (6, 3, 12, 12) and x.dtype == np.float32


def test_a_folder_is_decoded_once_and_again_when_its_content_or_size_changes(tmp_path, cache, monkeypatch):
    from PIL import Image
    root = make_folder(tmp_path / "imgs")
    first = data.load("folder", str(root), input_size=16)
    assert len(list(cache.glob("folder-*.npz"))) == 2           # one per split
    calls = []
    real = data._fit
    monkeypatch.setattr(data, "_fit", lambda f, size: calls.append(f) or real(f, size))
    again = data.load("folder", str(root), input_size=16)
    assert calls == [] and torch.equal(again.train.tensors[0], first.train.tensors[0])
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(root / "val" / "one" / "new.png")
    assert len(data.load("folder", str(root), input_size=16).test) == 7
    assert len(calls) == 7 and len(list(cache.glob("folder-*.npz"))) == 3   # only val/ decoded again
    data.load("folder", str(root), input_size="16x20")
    assert len(list(cache.glob("folder-*.npz"))) == 5 and not list(cache.glob("*.tmp*"))


def test_a_large_folder_is_decoded_per_item_with_the_same_pixels(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    resident = data.load("folder", str(root), input_size="12x16", test_subset=3)
    monkeypatch.setattr(data, "RESIDENT_BYTES", 12 * 3 * 12 * 16 * 4)       # train fits, train + test does not
    files = data.load("folder", str(root), input_size="12x16", test_subset=3)
    assert isinstance(files.train, data.FolderImages) and files.workers >= 1
    assert data.resident_tensors(files.train) is None
    x, y = files.train[5]
    assert torch.equal(x, resident.train.tensors[0][5]) and y == 1
    xr, yr = data.test_arrays(resident)
    xf, yf = data.test_arrays(files)
    assert np.array_equal(xr, xf) and np.array_equal(yr, yf) and len(yf) == 3


@pytest.mark.parametrize("size, expected", [("32", (32, 32)), ("48x64", (48, 64)), ("48X64", (48, 64)),
                                            (32, (32, 32)), ((12, 20), (12, 20)), ([7, 9], (7, 9))])
def test_input_sizes_parse(size, expected):
    assert data.parse_input_size(size) == expected


@pytest.mark.parametrize("size", ["", "32x", "x32", "0", "32x0", "-4", "3.5", "32x32x3", "big", (32,), (0, 5)])
def test_a_malformed_input_size_is_named(size):
    with pytest.raises(data.DataError, match=r"--input-size .*: expected H or HxW in pixels"):
        data.parse_input_size(size)


def _break(root: Path, how: str) -> str:
    """Damage a good folder one way; returns the message expected."""
    import shutil
    if how == "missing":
        shutil.rmtree(root)
        return f"--data-dir {root}: no such directory"
    if how == "no train":
        shutil.rmtree(root / "train")
        return f"--data-dir {root}: no train/ folder"
    if how == "no val":
        shutil.rmtree(root / "val")
        return f"--data-dir {root}: no val/ or test/ folder"
    if how == "no class folders":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
        (root / "val" / "a.png").write_bytes(b"")
        return f"{root / 'val'}: no class folders"
    if how == "no images":
        for f in (root / "val").glob("*/*"):
            f.unlink()
        (root / "val" / "one" / "readme.md").write_text("")
        return f"{root / 'val'}: no images in its class folders (looked for .jpg, .jpeg, .png"
    if how == "empty class":
        for f in (root / "train" / "two").glob("*"):
            f.unlink()
        return f"{root / 'train' / 'two'}: no images"
    if how == "one class":
        for split in ("train", "val"):
            for c in ("two", "zero"):
                shutil.rmtree(root / split / c)
        return f"{root / 'train'}: one class folder (one): a classifier needs at least 2"
    if how == "classes differ":
        (root / "val" / "zero").rename(root / "val" / "eight")
        (root / "val" / "two").rename(root / "val" / "nine")
        return (f"--data-dir {root}: train/ and val/ have different class folders "
                "(only in train/: two, zero; only in val/: eight, nine)")
    if how == "corrupt":
        bad = root / "train" / "two" / "001.jpg"
        bad.write_bytes(b"not an image at all")
        return f"{bad}: not a readable image (UnidentifiedImageError)"
    if how == "truncated":
        bad = root / "val" / "zero" / "000.png"
        bad.write_bytes(bad.read_bytes()[:60])
        return f"{bad}: not a readable image (OSError: "
    raise AssertionError(how)


BREAKS = ["missing", "no train", "no val", "no class folders", "no images", "empty class", "one class",
          "classes differ", "corrupt", "truncated"]


@pytest.mark.parametrize("how", BREAKS)
def test_a_bad_folder_is_one_line_naming_it(tmp_path, cache, how):
    root = make_folder(tmp_path / "imgs", train=2, test=1)
    message = _break(root, how)
    with pytest.raises(data.DataError) as e:
        data.load("folder", str(root), input_size=16)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not list(cache.glob("*.tmp*"))


def test_folder_options_are_checked_in_one_line_before_training(tmp_path, cache, cli_error):
    root = make_folder(tmp_path / "imgs", train=2, test=1)
    run = tmp_path / "run"
    train = ["train", "--model", "resnet20", "--epochs", "1", "--out", str(run)]
    for args, message in (
            (["--dataset", "folder", "--data-dir", str(root)], "--input-size H or HxW is required for --dataset folder"),
            (["--dataset", "folder", "--data-dir", str(root), "--input-size", "16x"], "--input-size 16x: expected H or HxW"),
            (["--dataset", "cifar10", "--input-size", "16"], "--input-size 16: only --dataset folder takes an input size"),
            (["--dataset", "folder", "--input-size", "16"], "--data-dir is required for --dataset folder"),
            (["--dataset", "folder", "--data-dir", str(tmp_path / "nowhere"), "--input-size", "16"],
             f"--data-dir {tmp_path / 'nowhere'}: no such directory"),
            (["--dataset", "folder", "--data-dir", str(root), "--input-size", "16", "--model", "digits-cnn"],
             "--model digits-cnn does not take --dataset folder's images (3, 16, 16): Given groups=1")):
        err = cli_error(train + args)
        assert message in err, (args, err)
    assert not run.exists()
    _break(root, "corrupt")
    assert "001.jpg: not a readable image" in cli_error(train + ["--dataset", "folder", "--data-dir", str(root),
                                                                 "--input-size", "16"])


def test_eval_and_deploy_reload_the_recorded_folder_and_check_its_classes(tmp_path, cache):
    root = make_folder(tmp_path / "imgs", train=2, test=1)
    meta = {"dataset": "folder", "data_dir": str(root), "classes": list(CLASSES)}
    spec = data.model_test_split(meta, (3, 10, 14), (3,))
    assert spec.input_shape == (3, 10, 14) and len(spec.test) == 3
    other = make_folder(tmp_path / "other", train=2, test=1, classes=("bird", "cat", "dog"))
    with pytest.raises(data.DataError, match=r"classes are not the ones the model was trained on "
                                             r"\(label order: one != bird, two != cat, zero != dog\)"):
        data.model_test_split(meta, (3, 10, 14), (3,), data_dir=str(other))
    with pytest.raises(data.DataError, match="does not fit dataset 'folder' with 3 classes"):
        data.model_test_split(meta, (3, 10, 14), (4,))
    meta["data_dir"] = str(tmp_path / "moved")
    with pytest.raises(data.DataError, match=f"the training run's --data-dir {tmp_path / 'moved'} is gone"):
        data.model_test_split(meta, (3, 10, 14), (3,))
    assert len(data.model_test_split(meta, (3, 10, 14), (3,), data_dir=str(root)).test) == 3


def test_a_run_that_kept_its_data_dir_relative_still_resumes(tmp_path, monkeypatch):
    """`mixq train` now stores --data-dir absolute; a checkpoint written before, with the path
    as typed, resumes from the same directory with the same option."""
    from mixq.train.checkpoint import resume_state
    from mixq.train.config import TrainConfig
    from mixq.train.errors import TrainError
    monkeypatch.chdir(tmp_path)
    old = TrainConfig(dataset="cifar10", data_dir="data/cifar.tar.gz")
    torch.save({"model": {}, "config": old.to_dict(), "epoch": 0, "optimizers": {}, "schedulers": {},
                "history": []}, tmp_path / "checkpoint.pt")
    now = TrainConfig(dataset="cifar10", data_dir=str(tmp_path / "data/cifar.tar.gz"))
    assert resume_state(tmp_path / "checkpoint.pt", now)["epoch"] == 0
    with pytest.raises(TrainError, match="data_dir: run has"):
        resume_state(tmp_path / "checkpoint.pt", TrainConfig(dataset="cifar10", data_dir="other/cifar.tar.gz"))


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_a_folder_trained_model_freezes_compiles_and_deploys_bit_exact(tmp_path, monkeypatch, capsys, mixq):
    """resnet20 (3-channel input, any size: global pooling) on 16x16 images, trained from a
    relative --data-dir: freeze records the folder, and eval and deploy (run from another
    directory) find it again, at the model's input size. Train, freeze and eval run in this
    process, compile and deploy as commands: 42 s on 2 cores shared with a training job."""
    from mixq import cli
    make_folder(tmp_path / "work" / "imgs", train=8, test=4)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path / "work")
    assert cli.main(["train", "--model", "resnet20", "--dataset", "folder", "--data-dir", "imgs", "--input-size", "16",
                     "--epochs", "1", "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == "folder" and m["train_images"] == 24 and m["test_images"] == 12
    cfg = torch.load(run / "checkpoint.pt", weights_only=True)["config"]
    assert cfg["data_dir"] == str(tmp_path / "work" / "imgs") and cfg["input_size"] == [16, 16]
    assert cfg["input_shape"] == [3, 16, 16] and cfg["classes"] == list(CLASSES) and cfg["num_classes"] == 3
    monkeypatch.chdir(tmp_path)
    assert cli.main(["freeze", str(run / "checkpoint.pt"), "--out", str(frozen)]) == 0
    meta = json.loads((frozen / "manifest.json").read_text())["meta"]
    assert meta["data_dir"] == str(tmp_path / "work" / "imgs") and meta["classes"] == list(CLASSES)
    capsys.readouterr()
    assert cli.main(["eval", str(frozen)]) == 0
    assert "resnet20 on folder: top-1" in capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok(mixq("compile", frozen, "--out", build, env=env))
    out = ok(mixq("deploy", build, "--repeat", "3", "--no-progress", env=env))
    assert "resnet20 on folder" in out and "bit-exact vs golden interpreter: yes (12 images)" in out, out
    report = json.loads((build / "report.json").read_text())
    assert report["bit_exact"] is True and report["images_checked"] == report["accuracy_images"] == 12
    assert report["accuracy"] == report["reference_accuracy"]
    assert report["accuracy"] == pytest.approx(report["trained_int_accuracy"], abs=1e-9)   # 100*k/12, two ways
