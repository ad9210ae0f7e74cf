"""A user's own model through the CLI: `--model FILE.py:FUNCTION` / `package.module:FUNCTION`
(models.build_model), its source kept in the checkpoint so freeze and --resume rebuild it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

NET = '''
import torch.nn as nn


def small_net(num_classes):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def not_a_module(num_classes):
    return "a string"
'''


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_a_model_file_trains_and_deploys_bit_exact_after_the_file_is_gone(tmp_path, mixq):
    src = tmp_path / "src"
    src.mkdir()
    (src / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mixq.cli", "train", "--model", "mynet.py:small_net", "--epochs", "10",
                        "--out", str(run)], cwd=src, capture_output=True, text=True, env=env, timeout=600)
    ok(r)
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "mynet.py:small_net" and len(m["layers"]) == 3
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["model_source"] == {"spec": "mynet.py:small_net", "file": "mynet.py", "text": NET}
    shutil.rmtree(src)              # freeze, compile and deploy rebuild the net from the checkpoint
    ok(mixq("freeze", run / "checkpoint.pt", "--out", frozen))
    ok(mixq("compile", frozen, "--out", build))
    out = ok(mixq("deploy", build, "--no-progress"))
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out
    deployed = json.loads((build / "report.json").read_text())
    assert deployed["bit_exact"] is True and deployed["accuracy"] == deployed["reference_accuracy"] == deployed["trained_int_accuracy"]


def test_a_package_module_model_is_imported_by_name(tmp_path, mixq):
    pkg = tmp_path / "lib" / "usernets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cnn.py").write_text(NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "lib")}
    ok(mixq("train", "--model", "usernets.cnn:small_net", "--epochs", "1", "--out", tmp_path / "run", env=env))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["model_source"] == {"spec": "usernets.cnn:small_net", "module": "usernets.cnn"}


@pytest.mark.parametrize("spec, message", [
    ("missing.py:small_net", "--model missing.py:small_net: cannot read missing.py (FileNotFoundError)"),
    ("{net}:nothing", "mynet.py has no function 'nothing'"),
    ("{net}:not_a_module", "not_a_module(num_classes) returned str, not a torch nn.Module"),
    ("no_such_package_xyz.cnn:net", "cannot import no_such_package_xyz.cnn (ModuleNotFoundError"),
    ("resnet21", "unknown model 'resnet21' (choose from: digits-cnn, resnet20"),
])
def test_a_bad_model_spec_is_one_line_before_training(tmp_path, cli_error, spec, message):
    (tmp_path / "mynet.py").write_text(NET)
    spec = spec.format(net=tmp_path / "mynet.py")
    err = cli_error(["train", "--model", spec, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
