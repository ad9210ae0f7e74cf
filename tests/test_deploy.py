"""mixq deploy: a trained CSQ digits model, compiled for this CPU, run through TVM RPC (a local
server on 127.0.0.1, the same path as a board) is bit-exact with the golden interpreter on the
whole test split; the error paths (hash mismatch, unreachable or dropped board, wrong arch);
the local server is loopback-only and stops; the tracker path.

The session fixture trains digits for a few epochs, freezes and compiles once (~30-90 s)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mixq import data, graph as G
from mixq.runtime import deploy as D
from mixq.runtime import session as S

from conftest import CIFAR


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def quiet(_msg):
    pass


@pytest.fixture(scope="session")
def digits(tmp_path_factory, mixq):
    """RUN/{checkpoint.pt, metrics.json, frozen/, build-host/} from the CLI, and deploy's output."""
    run = tmp_path_factory.mktemp("digits") / "run"
    ok(mixq("train", "--epochs", "3", "--out", run))
    ok(mixq("freeze", run / "checkpoint.pt", "--out", run / "frozen"))
    ok(mixq("compile", run / "frozen", "--target", "host", "--out", run / "build-host"))
    deployed = ok(mixq("deploy", run / "build-host", "--dataset", "digits", "--no-progress"))
    return run, deployed


def free_port() -> int:
    return S.free_loopback_port()


# ----------------------------------------------------------------------------- the happy path
def test_digits_deploy_is_bit_exact_on_the_whole_test_split(digits):
    run, deployed = digits
    build = run / "build-host"
    report = json.loads((build / "report.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = len(data.load("digits").test)
    assert report["images_checked"] == n_test == 360
    assert report["bit_exact"] is True and report["mismatches"] == 0
    assert report["accuracy"] == report["reference_accuracy"]
    # the trained model under integer simulation measures exactly what the deployed program does
    assert abs(report["accuracy"] - metrics["int_accuracy"]) < 1e-6
    assert report["trained_accuracy"] == metrics["accuracy"]
    assert abs(report["accuracy"] - report["trained_accuracy"]) <= 0.3 + 100.0 / n_test, \
        "hardened float model and integer program disagree on more than one image beyond 0.3 points"
    lat = report["latency_ms"]
    assert 0 < lat["median"] <= lat["p90"] and lat["batch"] == 1 and lat["samples"] == 30
    assert report["artifact_bytes"] == (build / "model.so").stat().st_size
    assert report["board"].startswith("local RPC server 127.0.0.1:") and report["emulated"] is False
    assert report["target"]["kind"] == "llvm" and report["arch"] == report["board_arch"]
    assert "bit-exact vs golden interpreter: yes" in deployed.stdout and "latency" in deployed.stdout


def test_report_json_follows_the_umask_like_every_artifact(digits):
    run, _ = digits
    umask = os.umask(0)
    os.umask(umask)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "build-host").iterdir() if p.is_file()}
    assert mode == {"model.so": mode["model.so"], "deploy.json": 0o666 & ~umask, "report.json": 0o666 & ~umask}


def test_compiled_library_matches_golden_independently(digits):
    """Not trusting deploy's own comparison: load the .so here and compare every logit."""
    import tvm
    from tvm import relax
    run, _ = digits
    g = G.load(run / "frozen")
    x, _ = data.test_arrays(data.load("digits"))
    xq = G.quantize_input(g.input, x)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(run / "build-host" / "model.so")), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(xq[i:i + 100])).numpy() for i in range(0, len(xq), 100)])
    want = G.run_batched(g, xq)
    assert got.dtype == np.int32 and len(np.unique(want)) > 50
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- bad build dirs
def copy_build(digits, tmp_path) -> Path:
    run, _ = digits
    build = tmp_path / "build"
    shutil.copytree(run / "build-host", build)
    return build


def test_training_figures_come_from_the_build_itself(digits, tmp_path):
    """A build moved away from its run still reports the run's figures (the frozen manifest
    carries them); a frozen model without that record (made before freeze kept it) says n/a."""
    run, _ = digits
    metrics = json.loads((run / "metrics.json").read_text())
    build = copy_build(digits, tmp_path)
    report = D.deploy(build, images=20, repeat=2, progress=False, log=quiet)
    assert report["metrics_file"] == str(build / "frozen" / "manifest.json")
    assert (report["trained_accuracy"], report["trained_int_accuracy"], report["trained_test_images"]) == \
        (metrics["accuracy"], metrics["int_accuracy"], metrics["test_images"])
    assert (report["trained_method"], report["trained_target_bits"], report["trained_avg_bits"]) == \
        (metrics["method"], metrics["target_bits"], metrics["avg_bits"])
    manifest = build / "frozen" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["meta"]["training"]
    manifest.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    record = json.loads((build / "deploy.json").read_text())
    record["frozen_manifest_sha256"] = G.manifest_sha256(build / "frozen")
    (build / "deploy.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = []
    report = D.deploy(build, images=20, repeat=2, progress=False, log=lines.append)
    assert report["bit_exact"] and report["trained_accuracy"] is None and report["metrics_file"] is None
    assert "trained n/a" in lines[0]


def test_frozen_manifest_hash_mismatch_is_refused(digits, tmp_path, mixq):
    build = copy_build(digits, tmp_path)
    manifest = build / "frozen" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["meta"]["tampered"] = True
    manifest.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    r = mixq("deploy", build, "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "frozen_manifest_sha256" in r.stderr and "manifest.json" in r.stderr


def test_replaced_library_is_refused(digits, tmp_path, mixq):
    build = copy_build(digits, tmp_path)
    lib = build / "model.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    r = mixq("deploy", build, "--no-progress")
    assert r.returncode == 2 and "model.so: sha256 does not match" in r.stderr, r.stderr


def test_missing_library_is_refused(digits, tmp_path, mixq):
    build = copy_build(digits, tmp_path)
    (build / "model.so").unlink()
    r = mixq("deploy", build, "--no-progress")
    assert r.returncode == 2 and "model.so: missing" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- boards
def test_unreachable_board_is_a_one_line_error_after_a_bounded_retry(digits, mixq):
    run, _ = digits
    t0 = time.time()
    r = mixq("deploy", run / "build-host", "--board", f"127.0.0.1:{free_port()}", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unreachable after 3 attempts" in r.stderr and "127.0.0.1:" in r.stderr
    assert time.time() - t0 < 60


def test_library_for_another_arch_is_refused_by_the_board(digits, tmp_path, mixq):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)")
    run, _ = digits
    ok(mixq("compile", run / "frozen", "--target", "aarch64", "--out", tmp_path / "build-arm"))
    r = mixq("deploy", tmp_path / "build-arm", "--no-progress")     # a local x86 board
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "built for aarch64 but board" in r.stderr and "is x86_64" in r.stderr


def other_cpu() -> str:
    """An x86 CPU with instruction sets this host lacks (AMD's sse4a on an Intel host; Sapphire
    Rapids' AVX512-FP16 or AMX on anything older or an AMD)."""
    from mixq.compile import build as B
    for mcpu in ("sapphirerapids", "znver4", "graniterapids", "znver5"):
        if B.missing_cpu_features({"kind": "llvm", "mcpu": mcpu}):
            return mcpu
    pytest.skip("this host has every instruction set of the CPUs tried")


def test_library_for_a_cpu_with_instructions_this_host_lacks_is_refused(digits, tmp_path, mixq):
    """Not run (it would die of SIGILL): one line naming the CPU and what this one lacks."""
    from mixq.compile import build as B
    if B.host_arch() != "x86_64":
        pytest.skip("x86 CPUs")
    assert B.missing_cpu_features(B.host_target_config()) == []
    assert B.missing_cpu_features({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}) == []
    mcpu = other_cpu()
    run, _ = digits
    target = json.dumps({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    ok(mixq("compile", run / "frozen", "--target", target, "--out", tmp_path / "build-other"))
    r = mixq("deploy", tmp_path / "build-other", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"is built for CPU '{mcpu}'" in r.stderr and "recompile here with --target host" in r.stderr, r.stderr
    assert not (tmp_path / "build-other" / "report.json").exists()


def listening(port: int) -> list:
    import psutil
    return [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"]


def test_local_server_listens_on_loopback_only_and_stops():
    import psutil
    with S.local_server() as server:
        socks = listening(server.port)
        assert socks and all(c.laddr.ip == "127.0.0.1" for c in socks)
        assert psutil.pid_exists(server.pid)
        assert S.connect_board(server.host, server.port) is not None
        pid, port = server.pid, server.port
    deadline = time.time() + 10
    while time.time() < deadline and (listening(port) or _alive(pid)):
        time.sleep(0.2)
    assert not listening(port) and not _alive(pid)


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


PROXY = r"""
import signal, socket, sys, threading
target = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
conns = []

def pipe(a, b):
    try:
        while chunk := a.recv(1 << 16):
            b.sendall(chunk)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

def drop(*_):
    for s in list(conns):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conns.clear()

signal.signal(signal.SIGUSR1, drop)
print(listener.getsockname()[1], flush=True)
while True:
    client, _ = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", target))
    conns.extend([client, upstream])
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pipe, args=(a, b), daemon=True).start()
"""


class DroppingProxy:
    """A TCP proxy (its own process: TVM's RPC client may hold the GIL while it waits) in front
    of a server on loopback; `drop()` cuts the live connections like a network drop, and new
    connections still go through."""

    def __init__(self, target_port: int):
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, str(target_port)], stdout=subprocess.PIPE,
                                     text=True)
        self.port = int(self.proc.stdout.readline())

    def drop(self):
        import signal
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def drop_after_batches(monkeypatch, n: int, drop):
    real_run = S.RemoteModel.run
    calls = []

    def run(self, x, what="a batch"):
        calls.append(what)
        if len(calls) == n + 1:
            drop()
        return real_run(self, x, what)
    monkeypatch.setattr(S.RemoteModel, "run", run)
    return calls


def test_dropped_connection_reconnects_and_stays_bit_exact(digits, monkeypatch):
    run, _ = digits
    with S.local_server() as server:
        proxy = DroppingProxy(server.port)
        opens = []
        real_open = S.RemoteModel.open
        monkeypatch.setattr(S.RemoteModel, "open", lambda self: opens.append(1) or real_open(self))
        try:
            calls = drop_after_batches(monkeypatch, 2, proxy.drop)
            report = D.deploy(run / "build-host", S.BoardSpec("127.0.0.1", proxy.port), batch_size=50,
                              repeat=3, progress=False, log=quiet)
        finally:
            proxy.close()
    assert len(opens) == 2, "the dropped session was not reopened"
    assert len(calls) == 8 and report["bit_exact"] and report["images_checked"] == 360


def test_board_gone_mid_run_is_a_one_line_error(digits, monkeypatch):
    import tvm.rpc
    run, _ = digits
    port = free_port()
    server = tvm.rpc.Server(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    try:
        drop_after_batches(monkeypatch, 1, server.terminate)
        t0 = time.time()
        with pytest.raises(S.BoardError) as err:
            D.deploy(run / "build-host", S.BoardSpec("127.0.0.1", server.port), batch_size=50,
                     repeat=3, progress=False, log=quiet)
        assert time.time() - t0 < 60
    finally:
        server.terminate()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"lost board 127.0.0.1:{port} during images 50..99")
    assert "reconnecting failed" in msg and "unreachable after 3 attempts" in msg


def test_tracker_finds_the_board_by_key(digits):
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    from tvm.rpc.tracker import Tracker
    import tvm.rpc
    run, _ = digits
    port = free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    port = free_port()
    server = tvm.rpc.Server(host="127.0.0.1", port=port, port_end=port + 1,
                            tracker_addr=("127.0.0.1", tracker.port), key="mixq-test-board", silent=True)
    try:
        deadline = time.time() + 20       # the server registers asynchronously
        while time.time() < deadline:
            if "mixq-test-board" in tvm.rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"]:
                break
            time.sleep(0.5)
        report = D.deploy(run / "build-host", S.BoardSpec("127.0.0.1", tracker.port, key="mixq-test-board"),
                          images=60, repeat=3, progress=False, log=quiet)
        assert report["bit_exact"] and report["images_checked"] == 60
        assert report["board"] == f"tracker 127.0.0.1:{tracker.port} key mixq-test-board"
        with pytest.raises(S.BoardError, match="no board registered under key 'nope'.*mixq-test-board"):
            D.deploy(run / "build-host", S.BoardSpec("127.0.0.1", tracker.port, key="nope"),
                     images=10, repeat=1, progress=False, log=quiet)
    finally:
        server.terminate()
        tracker.terminate()


def test_deploy_option_errors_are_one_line(digits, mixq):
    run, _ = digits
    for args, message in ((["--tracker", "127.0.0.1:1"], "--tracker needs --key"),
                          (["--key", "k"], "--key needs --tracker"),
                          (["--board", "nohost"], "expected HOST:PORT"),
                          (["--images", "0"], "--images 0: must be >= 1"),
                          (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir /nonexistent")):
        r = mixq("deploy", run / "build-host", *args, "--no-progress")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)


def test_metrics_of_another_model_are_refused(digits, tmp_path, mixq):
    run, _ = digits
    other = tmp_path / "metrics.json"
    other.write_text(json.dumps({"model": "resnet20", "accuracy": 91.0}))
    r = mixq("deploy", run / "build-host", "--metrics", other, "--images", "10", "--no-progress")
    assert r.returncode == 2 and "not the metrics.json of a digits-cnn run" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.fixture(scope="module")
def resnet20(tmp_path_factory, mixq) -> Path:
    """A CSQ resnet20 run on 2000 CIFAR-10 images: 2 warm-up epochs of 8-bit STE weights, then
    2 CSQ epochs (from scratch, a few CSQ epochs stay near chance; this starts ~30-40%)."""
    if not CIFAR.exists():
        pytest.skip(f"{CIFAR} not present")
    run = tmp_path_factory.mktemp("resnet20") / "run"
    ok(mixq("train", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", CIFAR, "--epochs", "2",
            "--warmup-epochs", "2", "--finetune-epochs", "1",
            "--train-subset", "2000", "--test-subset", "500", "--out", run))
    ok(mixq("freeze", run / "checkpoint.pt", "--out", run / "frozen"))
    return run


@pytest.mark.slow
def test_cifar10_resnet20_is_bit_exact(resnet20, mixq):
    run = resnet20
    ok(mixq("compile", run / "frozen", "--out", run / "build-host"))
    # the same 500 evenly spread test images the run was evaluated on (--test-subset 500)
    r = ok(mixq("deploy", run / "build-host", "--data-dir", CIFAR, "--images", "500", "--no-progress"))
    print("\n" + r.stdout)
    report = json.loads((run / "build-host" / "report.json").read_text())
    assert report["bit_exact"] and report["images_checked"] == 500 and report["mismatches"] == 0
    assert report["accuracy"] == report["reference_accuracy"]
    assert report["trained_test_images"] == report["accuracy_images"] == 500
    assert report["accuracy"] > 20.0, "the run should be well above chance (10%) for this check to mean much"
    assert abs(report["accuracy"] - report["trained_int_accuracy"]) < 1e-6
    assert abs(report["accuracy"] - report["trained_accuracy"]) <= 0.3 + 100.0 / 500, \
        "hardened float model and integer program disagree on more than one image beyond 0.3 points"


@pytest.mark.slow
def test_cifar10_resnet20_is_bit_exact_on_the_emulated_aarch64_board(resnet20, mixq):
    from mixq.runtime import arm_board
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)")
    run = resnet20
    ok(mixq("compile", run / "frozen", "--target", "aarch64", "--out", run / "build-arm"))
    try:
        board = arm_board.start(free_port())
    except arm_board.BoardUnavailable as e:
        pytest.skip(f"emulated aarch64 board unavailable: {e}")
    try:
        r = ok(mixq("deploy", run / "build-arm", "--board", board.address, "--data-dir", CIFAR,
                    "--images", "100", "--repeat", "5", "--no-progress"))
    finally:
        board.stop()
    print("\n" + r.stdout)
    report = json.loads((run / "build-arm" / "report.json").read_text())
    assert report["bit_exact"] and report["images_checked"] == 100
    assert report["board_arch"] == "aarch64" and report["emulated"] is True
