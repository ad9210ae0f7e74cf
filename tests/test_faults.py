"""Faults around the artifacts: a full disk at every stage (one line naming the file, exit 2,
no temporary left, the previous artifact intact) and concurrent commands writing one
directory (the second fails at once naming the first's pid; the lock goes with its process).

The disk-full tests mount a small tmpfs and fill it: they need root and skip otherwise."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixq import cli, graph as G
from mixq.train.config import TrainConfig
from mixq.train.checkpoint import load_checkpoint
from mixq.train.loop import train


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes; all unmounted afterwards."""
    mounts = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("disk-full tests mount a small tmpfs, which needs root")
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path):
    """Write a file until the file system is full."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = 1 << 20
    try:
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                chunk //= 2
    finally:
        os.close(fd)


def leftovers(root: Path) -> list:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- a full disk
def test_train_on_a_full_disk_keeps_the_last_checkpoint(tmp_path, small_disk, capsys, run_error):
    """The first checkpoint fits, the second does not (its temporary needs as much room again)."""
    probe = tmp_path / "probe"
    train(TrainConfig(epochs=1, train_subset=100), str(probe))
    size = (probe / "checkpoint.pt").stat().st_size
    run = small_disk((size * 3 // 2) // 4096 * 4096) / "run"
    err = run_error(["train", "--epochs", "3", "--train-subset", "100", "--out", str(run)])
    assert err == f"mixq train: error: no space left on device writing {run / 'checkpoint.pt'}"
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0
    # the last good epoch's checkpoint and history (written every epoch), nothing half-written
    assert leftovers(run.parent) == [] and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "history.csv"]
    assert len((run / "history.csv").read_text().splitlines()) == 2


def test_freeze_compile_export_deploy_on_a_full_disk(small_disk, trained_digits, capsys, cli_error):
    digits = trained_digits
    disk = small_disk(32 << 20)
    frozen, build, onnx_file = disk / "frozen", disk / "build", disk / "model.onnx"
    stages = {
        "freeze": (["freeze", str(digits["run"] / "checkpoint.pt"), "--out", str(frozen)], frozen),
        "compile": (["compile", str(frozen), "--out", str(build)], build),
        "export-onnx": (["export-onnx", str(frozen), str(onnx_file)], onnx_file),
        "deploy": (["deploy", str(build), "--images", "20", "--repeat", "2", "--no-progress"], build / "report.json"),
    }
    for argv, _ in stages.values():
        assert cli.main(argv) == 0
    def artifacts():
        return sorted((str(p.relative_to(disk)), p.read_bytes()) for p in disk.rglob("*")
                      if p.is_file() and p.name != "filler")

    before = artifacts()
    fill(disk)
    for name, (argv, path) in stages.items():
        err = cli_error(argv)
        assert err == f"mixq {name}: error: no space left on device writing {path}\n", err
        assert leftovers(disk) == [], name
    assert artifacts() == before
    assert G.load(frozen).model == "digits-cnn" and json.loads((build / "report.json").read_text())["bit_exact"]


# ----------------------------------------------------------------------------- concurrent commands
def test_two_trains_into_one_run_dir(tmp_path, mixq_train):
    """Two `mixq train --out R` started together: one trains, the other fails at once naming it."""
    run = tmp_path / "run"
    argv = mixq_train("--epochs", "5", "--out", run)
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert results[loser][1].strip().splitlines() == [
        f"mixq train: error: {run}: locked by another mixq process (pid {procs[winner].pid})"]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]        # no lock file left


def test_freeze_and_compile_outputs_are_locked_until_the_holder_dies(trained_digits, tmp_path, capsys, cli_error):
    digits = trained_digits
    frozen, build = tmp_path / "frozen", tmp_path / "build"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mixq import fsio\n"
         "locks = [fsio.DirLock(p, RuntimeError) for p in sys.argv[1:]]\nprint('held', flush=True)\ntime.sleep(600)",
         str(frozen), str(build)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = cli_error(["freeze", str(digits["run"] / "checkpoint.pt"), "--out", str(frozen)])
        assert err == f"mixq freeze: error: {frozen}: locked by another mixq process (pid {holder.pid})\n"
        err = cli_error(["compile", str(digits["frozen"]), "--out", str(build)])
        assert err == f"mixq compile: error: {build}: locked by another mixq process (pid {holder.pid})\n"
        assert not frozen.exists() and not build.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the locks with the process: both commands run, and leave no lock file
    assert cli.main(["freeze", str(digits["run"] / "checkpoint.pt"), "--out", str(frozen)]) == 0
    assert cli.main(["compile", str(frozen), "--out", str(build)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "frozen"]
