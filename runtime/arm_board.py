"""An emulated aarch64 board: TVM's RPC server running under qemu user-mode emulation.

`mixq deploy BUILD --board 127.0.0.1:9091` talks to it exactly as to a real Raspberry Pi /
Jetson-class board running `python -m tvm.exec.rpc_server`. The board is an arm64 Debian
sysroot (python3.X and the C libraries it needs, unpacked with `dpkg -x`) plus the aarch64
wheels of apache-tvm, apache-tvm-ffi and numpy, all run by `qemu-aarch64-static -L sysroot`.

    python -m mixq.runtime.arm_board start   # set up if missing, serve on 127.0.0.1:9091
    python -m mixq.runtime.arm_board stop

    with arm_board.start(port) as board:     # from Python / tests
        remote = tvm.rpc.connect(board.host, board.port)

Everything is cached outside git, in $MIXQ_ARM_BOARD_DIR or ~/.cache/mixq/arm-board:
  apt/        private apt state: arm64 package lists (the host's apt config is not touched)
  downloads/  the .deb and .whl files
  board/      the finished board: sysroot/, site/, python-aarch64 (shim), MANIFEST.json
  server-PORT.pid / server-PORT.log   one per running server
Setup needs qemu-user-static, apt-get, dpkg-deb and pip reaching Debian and PyPI mirrors; it is
idempotent (a board whose MANIFEST matches the host's TVM/numpy versions is reused) and atomic
(the board is built in a temp dir and renamed into place).
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from mixq import fsio
from mixq.errors import MixqError

DEFAULT_PORT = 9091
HOST = "127.0.0.1"  # loopback only: the RPC server runs whatever code a client uploads
QEMU = "qemu-aarch64-static"
LAYOUT_VERSION = 1  # bump when the board's layout changes, so old caches are rebuilt

# aarch64 wheels for the board; versions follow the host venv so the RPC protocol and module
# format match the compiler that builds the libraries. tvm.rpc's server needs cloudpickle and
# psutil (its popen worker), tvm needs ml_dtypes and typing_extensions.
BOARD_WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions",
                "cloudpickle", "psutil"]
# The board only runs compiled libraries, so it loads TVM's runtime library alone
# (TVM_USE_RUNTIME_LIB=1): the 240 MB compiler library is neither unpacked nor loaded.
SKIPPED_WHEEL_FILES = ("tvm/lib/libtvm_compiler.so",)

SHIM = """#!/bin/sh
# The board's python: the aarch64 CPython of sysroot/, run by qemu user-mode emulation.
# TVM's RPC server re-executes sys.executable (its popen worker); site/sitecustomize.py points
# sys.executable back at this script, since there is no binfmt_misc to run aarch64 ELF files.
here=$(dirname "$(readlink -f "$0")")
export PYTHONPATH="$here/site" PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1
export MIXQ_BOARD_PYTHON="$here/python-aarch64"
unset PYTHONHOME VIRTUAL_ENV
exec {qemu} -L "$here/sysroot" "$here/sysroot/usr/bin/python{pyver}" "$@"
"""

SITECUSTOMIZE = """import os, sys
# Child pythons (TVM's popen worker) must start through the qemu shim, not the bare aarch64 ELF.
sys.executable = os.environ.get("MIXQ_BOARD_PYTHON", sys.executable)
"""


class BoardUnavailable(MixqError, RuntimeError):
    """The emulated board cannot be set up here (no qemu, apt or network)."""


class BoardError(MixqError, RuntimeError):
    """The board's RPC server failed to start or stop."""


def cache_dir(root: Path | str | None = None) -> Path:
    """`root` if given, else $MIXQ_ARM_BOARD_DIR, else ~/.cache/mixq/arm-board; resolved, since
    the path is matched against the server's command line."""
    if root is None and os.environ.get("MIXQ_ARM_BOARD_DIR"):
        root = os.environ["MIXQ_ARM_BOARD_DIR"]
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixq" / "arm-board"
    return Path(root).expanduser().resolve()


def _say(msg: str) -> None:
    print(f"arm-board: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# setup: arm64 sysroot + aarch64 wheels
# ---------------------------------------------------------------------------------------------

def _host_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def expected_manifest() -> dict:
    """What a board built for this host must contain; compared with board/MANIFEST.json."""
    return {"layout": LAYOUT_VERSION,
            "wheels": {name: _host_version(name) for name in BOARD_WHEELS}}


def check_tools() -> None:
    missing = [t for t in (QEMU, "apt-get", "apt-cache", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        raise BoardUnavailable(f"missing {', '.join(missing)}: on Debian, "
                               f"`apt-get install qemu-user-static` (emulated aarch64 board)")


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines[-1:] or ["?"]
        raise BoardUnavailable(f"{what} failed: {errors[0]}")
    return proc.stdout


class _Apt:
    """apt-get/apt-cache for arm64 with private state under `root`: no dpkg --add-architecture,
    no change to the host's package lists; only the host's sources and keys are reused."""

    def __init__(self, root: Path):
        self.root = root
        self.options = ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
                        "-o", f"Dir::State::Lists={root / 'lists'}",
                        "-o", f"Dir::Cache={root / 'cache'}",
                        "-o", "Dir::State::status=/dev/null",  # nothing is installed for arm64
                        "-o", "Debug::NoLocking=1",
                        # offline: fail (and let tests skip) in seconds, not minutes
                        "-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=30"]

    def update(self) -> None:
        for d in (self.root / "lists" / "partial", self.root / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "-qq", "update"], "apt-get update (arm64 lists)")
        # apt-get update exits 0 even when every fetch failed
        if not any((self.root / "lists").glob("*_binary-arm64_Packages*")):
            raise BoardUnavailable("apt-get update fetched no arm64 package lists (offline, or "
                                   "no Debian sources in /etc/apt?)")

    def depends(self, package: str) -> str:
        return _run(["apt-cache", *self.options, "depends", package], f"apt-cache depends {package}")

    def recursive_depends(self, packages: list[str]) -> list[str]:
        out = _run(["apt-cache", *self.options, "depends", "--recurse", "--no-recommends",
                    "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                    "--no-enhances", *packages], "apt-cache depends --recurse")
        return sorted({ln.strip() for ln in out.splitlines() if ln and not ln[0].isspace()})

    def download(self, packages: list[str], dest: Path) -> None:
        # apt-get download writes into its current directory: a temp one, so no half-written .deb
        work = tempfile.mkdtemp(dir=dest, prefix=".apt-")
        try:
            proc = subprocess.run(["apt-get", *self.options, "-qq", "download", *packages],
                                  cwd=work, capture_output=True, text=True)
            if proc.returncode != 0:
                err = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or ["?"]
                raise BoardUnavailable(f"apt-get download (arm64) failed: {err[0]}")
            for deb in Path(work).glob("*.deb"):
                deb.rename(dest / deb.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def board_python_version(apt: _Apt) -> str:
    """The X.Y of Debian's default python3 for arm64 (3.11 on bookworm)."""
    m = re.search(r"Depends: python(3\.\d+)-minimal", apt.depends("python3-minimal"))
    if not m:
        raise BoardUnavailable("cannot tell the arm64 python3 version from `apt-cache depends "
                               "python3-minimal`")
    return m.group(1)


def select_debs(closure: list[str], pyver: str) -> list[str]:
    """From the dependency closure of python3.X, keep the interpreter and the shared libraries
    it loads; drop tools (perl, dpkg, tar...) and virtual packages (`<name>`)."""
    keep = []
    for name in closure:
        if name.startswith("<") or name.startswith("libperl"):
            continue
        if name.startswith("lib") or name in (f"python{pyver}-minimal", "zlib1g"):
            keep.append(name)
    return keep


def _deb_name(filename: str) -> str:
    return filename.split("_", 1)[0]


def fetch_debs(apt: _Apt, dest: Path, log=_say) -> tuple[str, list[Path]]:
    dest.mkdir(parents=True, exist_ok=True)
    apt.update()
    pyver = board_python_version(apt)
    wanted = select_debs(apt.recursive_depends([f"python{pyver}-minimal",
                                                f"libpython{pyver}-stdlib", "libstdc++6"]), pyver)
    have = {_deb_name(p.name) for p in dest.glob("*.deb")}
    missing = [name for name in wanted if name not in have]
    if missing:
        log(f"downloading {len(missing)} arm64 .deb packages (python{pyver} and its libraries)")
        apt.download(missing, dest)
    debs = [p for p in sorted(dest.glob("*.deb")) if _deb_name(p.name) in wanted]
    return pyver, debs


def fetch_wheels(pyver: str, dest: Path, log=_say) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, version in expected_manifest()["wheels"].items():
        specs.append(f"{name}=={version}" if version else name)
    log(f"downloading aarch64 wheels: {' '.join(specs)}")
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
          "--retries", "1", "--timeout", "30",
          "--only-binary=:all:", "--no-deps", "--dest", str(dest),
          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
          "--python-version", pyver, "--implementation", "cp",
          "--abi", f"cp{pyver.replace('.', '')}", "--abi", "abi3", "--abi", "none", *specs],
         "pip download (aarch64 wheels)")
    wheels = []
    for name, version in expected_manifest()["wheels"].items():
        stem = re.sub(r"[-_.]+", "_", name).lower()
        found = sorted(p for p in dest.glob("*.whl")
                       if p.name.lower().startswith(f"{stem}-{version or ''}"))
        if not found:
            raise BoardUnavailable(f"pip download gave no aarch64 wheel for {name} {version or ''}")
        wheels.append(found[-1])
    return wheels


def _unpack_wheel(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename in SKIPPED_WHEEL_FILES:
                continue
            path = Path(z.extract(info, site))
            mode = info.external_attr >> 16  # keep the executable bits of shared libraries
            if mode & 0o111:
                path.chmod(path.stat().st_mode | 0o111)


def _board_ready(board: Path) -> bool:
    try:
        return json.loads((board / "MANIFEST.json").read_text())["want"] == expected_manifest()
    except (OSError, ValueError, KeyError):
        return False


def setup(root: Path | None = None, log=_say) -> Path:
    """Build the board under `root` (default cache_dir()) unless an up-to-date one is there.
    Returns the board directory (holding the `python-aarch64` shim)."""
    check_tools()
    root = cache_dir(root)
    board = root / "board"
    if _board_ready(board):
        return board
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second setup waits, then finds the board ready
        if _board_ready(board):
            return board
        t0 = time.time()
        pyver, debs = fetch_debs(_Apt(root / "apt"), root / "downloads" / "debs", log)
        wheels = fetch_wheels(pyver, root / "downloads" / "wheels", log)
        log(f"unpacking {len(debs)} .deb and {len(wheels)} wheels")
        tmp = Path(tempfile.mkdtemp(dir=root, prefix="board.tmp-"))
        try:
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(tmp / "sysroot")], f"dpkg-deb -x {deb.name}")
            for wheel in wheels:
                _unpack_wheel(wheel, tmp / "site")
            (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
            shim = tmp / "python-aarch64"
            shim.write_text(SHIM.format(qemu=QEMU, pyver=pyver))
            shim.chmod(0o755)
            _smoke_test(shim)
            manifest = {"want": expected_manifest(), "python": pyver,
                        "debs": [p.name for p in debs], "wheels": [p.name for p in wheels]}
            (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
            fsio.replace_dir(tmp, board)            # an outdated board goes only once this one is in place
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"board ready in {time.time() - t0:.0f} s: {board}")
        return board


def _smoke_test(shim: Path) -> None:
    code = "import platform, tvm, numpy; print(platform.machine(), tvm.__version__)"
    proc = subprocess.run([str(shim), "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not proc.stdout.startswith("aarch64 "):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BoardError(f"the board's python does not start under {QEMU}: {last}")


# ---------------------------------------------------------------------------------------------
# the RPC server
# ---------------------------------------------------------------------------------------------

class Board:
    """A running RPC server; `stop()` (or leaving a `with` block) ends it."""

    def __init__(self, port: int, pid: int, root: Path, proc: subprocess.Popen | None = None):
        self.host, self.port, self.pid, self.root = HOST, port, pid, root
        self._proc = proc  # set when this process started the server

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return _log_file(self.root, self.port)

    def connect(self, session_timeout: float = 0):
        import tvm.rpc
        return tvm.rpc.connect(self.host, self.port, session_timeout=session_timeout)

    def stop(self) -> None:
        stop(self.port, self.root)
        if self._proc is not None:
            self._proc.wait(timeout=10)  # reaped already or about to be: no zombie, no warning

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Board({self.address}, pid={self.pid})"


def _pid_file(root: Path, port: int) -> Path:
    return root / f"server-{port}.pid"


def _log_file(root: Path, port: int) -> Path:
    return root / f"server-{port}.log"


def _is_our_server(pid: int, root: Path) -> bool:
    """True while `pid` is alive and is a qemu running this board (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return QEMU in cmdline and str(root / "board") in cmdline


def running(port: int = DEFAULT_PORT, root: Path | None = None) -> Board | None:
    root = cache_dir(root)
    try:
        pid = int(_pid_file(root, port).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return Board(port, pid, root) if _is_our_server(pid, root) else None


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((HOST, port)) == 0


def _answers(port: int) -> bool:
    """A full RPC handshake, not just an open socket."""
    import tvm.rpc
    try:
        remote = tvm.rpc.connect(HOST, port, session_timeout=60)
        remote.cpu().exist  # one round trip through the session
        return True
    except Exception:  # noqa: BLE001 - any failure means "not serving yet"
        return False


def start(port: int = DEFAULT_PORT, root: Path | None = None, timeout: float = 300,
          log=_say) -> Board:
    """Set the board up if needed and start its RPC server on 127.0.0.1:`port` in the background
    (its own session: it outlives this process until stop()). Returns once it answers RPC."""
    root = cache_dir(root)
    board_dir = setup(root, log)
    if running(port, root):
        raise BoardError(f"an arm board already serves {HOST}:{port} (stop it: "
                         f"python -m mixq.runtime.arm_board stop --port {port})")
    if _port_in_use(port):
        raise BoardError(f"port {HOST}:{port} is already in use by another program")
    log_path = _log_file(root, port)
    with open(log_path, "w") as out:
        # --port-end port+1: fail rather than silently take the next free port
        proc = subprocess.Popen(
            [str(board_dir / "python-aarch64"), "-m", "tvm.exec.rpc_server", "--host", HOST,
             "--port", str(port), "--port-end", str(port + 1)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=root,
            start_new_session=True)  # own process group: stop() ends the server and its workers
    _pid_file(root, port).write_text(f"{proc.pid}\n")
    board = Board(port, proc.pid, root, proc)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _pid_file(root, port).unlink(missing_ok=True)
            last = (log_path.read_text().strip().splitlines() or ["no output"])[-1]
            raise BoardError(f"the board's RPC server exited ({proc.returncode}): {last}")
        if _port_in_use(port) and _answers(port):
            return board
        time.sleep(1)
    board.stop()
    raise BoardError(f"the board's RPC server did not answer on {HOST}:{port} in {timeout:.0f} s "
                     f"(log: {log_path})")


def stop(port: int = DEFAULT_PORT, root: Path | None = None, grace: float = 10) -> bool:
    """Stop the board's server on `port`; False if none was running."""
    root = cache_dir(root)
    board = running(port, root)
    _pid_file(root, port).unlink(missing_ok=True)
    if board is None:
        return False
    # The server leads its own process group (start_new_session): its popen worker and session
    # children are in it too. Done when the whole group is gone.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(board.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + grace
        while time.time() < deadline:
            try:  # reap the server if this process started it, else init does
                os.waitpid(board.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            try:
                os.killpg(board.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
    raise BoardError(f"could not stop the board's RPC server (pid {board.pid})")


# ---------------------------------------------------------------------------------------------
# command line: python -m mixq.runtime.arm_board {setup,start,stop,status}
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixq.runtime.arm_board",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["setup", "start", "stop", "status"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--dir", type=Path, default=None,
                        help="cache directory (default $MIXQ_ARM_BOARD_DIR or ~/.cache/mixq/arm-board)")
    args = parser.parse_args(argv)
    root = cache_dir(args.dir)
    stop_cmd = f"make arm-board-stop  (or: python -m mixq.runtime.arm_board stop --port {args.port})"
    try:
        if args.action == "setup":
            print(setup(root))
        elif args.action == "start":
            board = running(args.port, root)
            if board:
                print(f"arm board already serving {board.address} (pid {board.pid}); stop: {stop_cmd}")
                return 0
            t0 = time.time()
            board = start(args.port, root)
            print(f"arm board serving {board.address} (pid {board.pid}, up in {time.time() - t0:.0f} s, "
                  f"log {board.log_path})\n"
                  f"  deploy: mixq deploy BUILD_DIR --board {board.address}\n"
                  f"  stop:   {stop_cmd}")
        elif args.action == "stop":
            print(f"arm board on port {args.port} " + ("stopped" if stop(args.port, root) else "was not running"))
        else:
            board = running(args.port, root)
            print(f"arm board serving {board.address} (pid {board.pid})" if board
                  else f"no arm board on port {args.port}")
            return 0 if board else 1
    except (BoardUnavailable, BoardError) as e:
        print(f"arm-board: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
