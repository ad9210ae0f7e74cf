"""The emulated aarch64 board (mixq.runtime.arm_board): a cross-compiled aarch64 TVM library runs
on it through TVM RPC and is bit-exact against NumPy.

The board tests set the board up in ~/.cache/mixq/arm-board (or $MIXQ_ARM_BOARD_DIR) if it is not
there (about 12 s here with a fast Debian/PyPI mirror, 120 MB of downloads), start a server on a
free loopback port (about 15 s: TVM imports twice under qemu) and skip when qemu, apt or the
mirrors are unavailable. The slow test runs the whole pipeline (train digits, freeze, compile for
aarch64, deploy on the board)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

from mixq.runtime import arm_board

from conftest import CIFAR, needs_cifar

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
CROSS_CXX = "aarch64-linux-gnu-g++"
ELF_MACHINE_AARCH64 = 183


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# fast: no network, no emulation
# ---------------------------------------------------------------------------------------------

def test_select_debs_keeps_python_and_libraries_only():
    closure = ["<libc-dev>", "dpkg", "gcc-12-base", "libc6", "libexpat1", "libperl5.36",
               "libpython3.11-stdlib", "perl", "python3.11-minimal", "tar", "zlib1g"]
    assert arm_board.select_debs(closure, "3.11") == [
        "libc6", "libexpat1", "libpython3.11-stdlib", "python3.11-minimal", "zlib1g"]


def test_missing_qemu_is_reported_as_unavailable(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == arm_board.QEMU else "/bin/true")
    with pytest.raises(arm_board.BoardUnavailable, match="qemu-aarch64-static"):
        arm_board.setup()


def test_board_is_rebuilt_when_host_versions_change(tmp_path):
    board = tmp_path / "board"
    board.mkdir()
    want = arm_board.expected_manifest()
    (board / "MANIFEST.json").write_text(json.dumps({"want": want}))
    assert arm_board._board_ready(board)
    stale = json.loads(json.dumps(want))
    stale["wheels"]["apache-tvm"] = "0.0.1"
    (board / "MANIFEST.json").write_text(json.dumps({"want": stale}))
    assert not arm_board._board_ready(board)


def test_stale_pid_file_never_kills_an_unrelated_process(tmp_path, capsys):
    # a pid file naming a live process that is not the board's qemu (here: this test process)
    port = free_port()
    (tmp_path / f"server-{port}.pid").write_text(f"{os.getpid()}\n")
    assert arm_board.running(port, tmp_path) is None
    assert arm_board.main(["status", "--port", str(port), "--dir", str(tmp_path)]) == 1
    assert arm_board.main(["stop", "--port", str(port), "--dir", str(tmp_path)]) == 0
    assert "was not running" in capsys.readouterr().out
    assert not (tmp_path / f"server-{port}.pid").exists()


# ---------------------------------------------------------------------------------------------
# the board itself
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def board():
    if shutil.which(CROSS_CXX) is None:
        pytest.skip(f"{CROSS_CXX} missing (apt-get install g++-aarch64-linux-gnu)")
    t0 = time.time()
    try:
        handle = arm_board.start(free_port())
    except arm_board.BoardUnavailable as e:
        pytest.skip(f"emulated aarch64 board unavailable: {e}")
    print(f"\narm board up in {time.time() - t0:.1f} s at {handle.address}")
    yield handle
    handle.stop()
    assert arm_board.running(handle.port, handle.root) is None
    handle.log_path.unlink(missing_ok=True)  # random ports: do not pile up logs in the cache


def int8_conv_requant_module():
    """int8 conv2d -> int32 accumulator + bias -> int64 fixed-point multiply, rounding shift,
    clip -> int8: the integer contract's building block."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 10, 10), "int8"))
    w = relax.Var("w", relax.TensorType((16, 8, 3, 3), "int8"))
    b = relax.Var("b", relax.TensorType((1, 16, 1, 1), "int32"))
    m = relax.Var("m", relax.TensorType((1, 16, 1, 1), "int64"))
    with bb.function("main", [x, w, b, m]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, w, padding=1, out_dtype="int32"))
            acc = bb.emit(relax.op.add(acc, b))
            wide = bb.emit(relax.op.multiply(relax.op.astype(acc, "int64"), m))
            half = relax.const(1 << (SHIFT - 1), "int64")
            shifted = bb.emit(relax.op.right_shift(relax.op.add(wide, half),
                                                   relax.const(SHIFT, "int64")))
            out = bb.emit_output(relax.op.astype(relax.op.clip(shifted, -128, 127), "int8"))
        bb.emit_func_output(out)
    return bb.get()


SHIFT = 20


def int8_conv_requant_numpy(x, w, b, m):
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    acc = np.einsum("nchwij,ocij->nohw", windows, w.astype(np.int64)) + b
    y = (acc * m + (1 << (SHIFT - 1))) >> SHIFT
    return np.clip(y, -128, 127).astype(np.int8)


def test_cross_compiled_module_is_bit_exact_on_the_board(board, tmp_path):
    import tvm
    import tvm.support.cc
    from tvm import relax

    ex = tvm.compile(int8_conv_requant_module(), target=tvm.target.Target(AARCH64_TARGET))
    lib_path = tmp_path / "conv.so"
    ex.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler(CROSS_CXX))
    assert int.from_bytes(lib_path.read_bytes()[18:20], "little") == ELF_MACHINE_AARCH64

    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (1, 8, 10, 10), dtype=np.int8)
    w = rng.integers(-128, 128, (16, 8, 3, 3), dtype=np.int8)
    b = rng.integers(-50_000, 50_000, (1, 16, 1, 1), dtype=np.int32)
    m = rng.integers(1 << 10, 1 << 16, (1, 16, 1, 1), dtype=np.int64)  # acc*m exceeds int32
    want = int8_conv_requant_numpy(x, w, b, m)
    assert len(np.unique(want)) > 100, "requant scale saturates everything: a weak test"

    remote = board.connect()
    remote.upload(str(lib_path))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(lib_path.name), dev)
    args = [tvm.runtime.tensor(a, dev) for a in (x, w, b, m)]
    got = vm["main"](*args).numpy()
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)

    ms = vm.time_evaluator("main", dev, number=10, repeat=1)(*args).mean * 1e3
    print(f"\nint8 conv 8->16ch 10x10 on the emulated board: {ms:.2f} ms/call")


def test_second_server_on_a_busy_port_is_refused(board):
    with pytest.raises(arm_board.BoardError, match="already serves"):
        arm_board.start(board.port)


@pytest.mark.slow
def test_digits_train_freeze_compile_deploy_on_the_board(board, tmp_path, mixq):
    """The whole pipeline, ending on the emulated board: report.json says bit-exact."""
    if "aarch64" not in mixq("compile", "--help").stdout or "--board" not in mixq("deploy", "--help").stdout:
        pytest.skip("mixq compile --target aarch64 / mixq deploy --board not in this tree")
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    for args in (["train", "--epochs", "3", "--out", str(run)],
                 ["freeze", str(run / "checkpoint.pt"), "--out", str(frozen)],
                 ["compile", str(frozen), "--target", "aarch64", "--out", str(build)],
                 ["deploy", str(build), "--board", board.address, "--metrics",
                  str(run / "metrics.json"), "--no-progress"]):
        r = mixq(*args)
        assert r.returncode == 0, f"mixq {args[0]}: {r.stderr[-2000:]}"
    print("\n" + r.stdout)
    report = json.loads((build / "report.json").read_text())
    assert report["board"] == board.address and report["board_arch"] == "aarch64"
    assert report["images_checked"] > 0 and report["mismatches"] == 0
    assert report["bit_exact"] is True


@pytest.mark.slow
def test_signed_activations_and_depthwise_convs_are_bit_exact_on_the_board(board, tmp_path, mixq):
    """A user net with MobileNetV2's linear bottlenecks (int8 activations, out_signed) and
    depthwise convs, compiled for aarch64: every output bit-exact on the emulated board."""
    from test_user_model import NET
    (tmp_path / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    for args in (["train", "--model", f"{tmp_path / 'mynet.py'}:bottleneck_net", "--epochs", "3", "--out", str(run)],
                 ["freeze", str(run / "checkpoint.pt"), "--out", str(frozen)],
                 ["compile", str(frozen), "--target", "aarch64", "--out", str(build)],
                 ["deploy", str(build), "--board", board.address, "--repeat", "3", "--no-progress"]):
        r = mixq(*args)
        assert r.returncode == 0, f"mixq {args[0]}: {r.stderr[-2000:]}"
    report = json.loads((build / "report.json").read_text())
    assert report["board_arch"] == "aarch64" and report["mismatches"] == 0 and report["bit_exact"] is True


@pytest.mark.slow
@needs_cifar
def test_mobilenetv2_on_cifar10_trains_and_deploys_bit_exact_on_host_and_board(board, tmp_path, mixq):
    """MobileNetV2 (CIFAR-10 variant) a few epochs on a CIFAR-10 subset, 4-bit STE weights (CSQ's
    budget term dominates its first epochs: the task loss would not show the net learning), then
    freeze and deploy on the host and on the emulated aarch64 board: bit-exact."""
    run, frozen = tmp_path / "run", tmp_path / "frozen"
    r = mixq("train", "--model", "mobilenetv2", "--dataset", "cifar10", "--data-dir", str(CIFAR), "--method",
             "ste-uniform", "--weight-bits", "4", "--train-subset", "1024", "--test-subset", "200", "--epochs", "3",
             "--batch-size", "128", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    with open(run / "history.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < losses[0], losses
    assert mixq("freeze", str(run / "checkpoint.pt"), "--out", str(frozen)).returncode == 0
    for target, board_args, images in (("host", [], "200"), ("aarch64", ["--board", board.address], "20")):
        build = tmp_path / f"build-{target}"
        for args in (["compile", str(frozen), "--target", target, "--out", str(build)],
                     ["deploy", str(build), *board_args, "--images", images, "--repeat", "3", "--no-progress"]):
            r = mixq(*args)
            assert r.returncode == 0, f"mixq {args[0]} ({target}): {r.stderr[-2000:]}"
        report = json.loads((build / "report.json").read_text())
        assert report["bit_exact"] is True and report["images_checked"] == int(images), report
