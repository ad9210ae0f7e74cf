"""TVM RPC sessions for `mixq deploy`: a board, a tracker's board, or a local server.

All three give the same thing, a `tvm.rpc` session, so the host check and a real board run the
same code: upload the library, `load_module`, `relax.VirtualMachine(lib, remote.cpu())`.

- `local_server()` starts TVM's RPC server on 127.0.0.1 (a free port; loopback only, since an
  RPC server runs whatever library a client uploads) and stops it when the block ends.
- `connect(...)` retries briefly (a few seconds, `CONNECT_ATTEMPTS`) and then fails with one
  line naming the address.
- `board_arch(remote)` asks the board for its architecture: it downloads the first bytes of
  `/proc/self/exe` (the board's RPC server process, through TVM's own `download`) and reads
  the ELF header's machine field. Under qemu user-mode emulation `/proc/self/exe` is the
  emulated (aarch64) python, so an emulated board reports its guest arch.
- `RemoteModel` runs the library's `main` on batches and, if the session drops (an error, or
  no answer within max(60 s, 10x the slowest call so far): TVM's client has no timeout of its
  own), reconnects once (same bounded retry), uploads again and repeats the call before
  giving up with one line.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixq.errors import MixqError

LOOPBACK = "127.0.0.1"
CONNECT_ATTEMPTS = 3
RETRY_SECONDS = 1.0          # pause between attempts
CONNECT_TIMEOUT = 10.0       # one attempt: TCP connect + RPC handshake
TRACKER_REQUEST_TIMEOUT = 10.0
MIN_CALL_TIMEOUT = 60.0      # a remote call may take this long, or 10x the slowest one so far

# ELF e_machine -> arch (normalize_arch spelling)
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64", 21: "ppc64"}


class BoardError(MixqError, RuntimeError):
    """The board cannot be reached, dropped, or cannot run the library (one-line message)."""


class BoardTimeout(Exception):
    """A remote call did not return in time (a hung board or a half-open connection)."""


def call_with_timeout(fn, timeout: float):
    """fn() in a daemon thread, waited for at most `timeout` seconds.

    TVM's RPC client blocks in recv() with no timeout of its own: a board that stops
    answering without closing the connection would hang us forever. On a timeout the thread
    is abandoned (it holds only the dead session)."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BoardTimeout(f"no answer in {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


# ----------------------------------------------------------------------------- addresses
def parse_address(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BoardError(f"{option} {text}: expected HOST:PORT, e.g. 127.0.0.1:9091")
    return host, int(port)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def is_local_host(host: str) -> bool:
    """True when `host` is this machine (loopback or one of its own addresses)."""
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    if any(a.startswith("127.") or a == "::1" for a in addrs):
        return True
    try:
        own = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        own = set()
    return bool(addrs & own)


# ----------------------------------------------------------------------------- local server
@dataclass
class LocalServer:
    host: str
    port: int
    pid: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.contextmanager
def local_server():
    """TVM's RPC server on 127.0.0.1:<free port> in a child process, stopped on exit.

    Its log (TVM prints a line per upload/download) goes to a temp file, not our terminal."""
    import tvm.rpc

    log = tempfile.NamedTemporaryFile(prefix="mixq-rpc-", suffix=".log", delete=False)
    saved_stderr, saved_stdout = os.dup(2), os.dup(1)
    try:
        os.dup2(log.fileno(), 2)                  # the server process inherits these
        os.dup2(log.fileno(), 1)
        port = free_loopback_port()
        server = tvm.rpc.Server(host=LOOPBACK, port=port, port_end=port + 1, silent=True)
    finally:
        os.dup2(saved_stderr, 2)
        os.dup2(saved_stdout, 1)
        os.close(saved_stderr)
        os.close(saved_stdout)
        log.close()
    try:
        # the server's process (PopenWorker keeps it in _proc): tests check it is gone afterwards
        yield LocalServer(LOOPBACK, server.port, server.proc._proc.pid, Path(log.name))  # noqa: SLF001
    finally:
        server.terminate()
        Path(log.name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- connect
def _with_retry(what: str, fn, attempts: int = CONNECT_ATTEMPTS, pause: float = RETRY_SECONDS,
                timeout: float = CONNECT_TIMEOUT):
    last = None
    t0 = time.time()
    for i in range(attempts):
        try:
            return call_with_timeout(fn, timeout)
        except BoardError:
            raise
        except Exception as e:  # noqa: BLE001 - TVM raises InternalError/RuntimeError/OSError
            last = e
            if i + 1 < attempts:
                time.sleep(pause)
    raise BoardError(f"{what}: unreachable after {attempts} attempts in {time.time() - t0:.0f} s "
                     f"({_last_line(last)})")


def _check_port(host: str, port: int, timeout: float = 2.0):
    with socket.create_connection((host, port), timeout=timeout):
        pass


def connect_board(host: str, port: int, session_timeout: float = 0):
    import tvm.rpc

    def attempt():
        _check_port(host, port)           # fail fast on a closed port or a dead host
        return tvm.rpc.connect(host, port, session_timeout=session_timeout)
    return _with_retry(f"board {host}:{port}", attempt)


def connect_tracker(host: str, port: int, key: str, session_timeout: float = 0):
    """A board registered under `key` at the tracker; refuses an unknown key instead of waiting."""
    import tvm.rpc

    def tracker_session():
        _check_port(host, port)
        return tvm.rpc.connect_tracker(host, port)
    tracker = _with_retry(f"tracker {host}:{port}", tracker_session)
    try:
        keys = set(call_with_timeout(tracker.summary, CONNECT_TIMEOUT).get("queue_info", {}))
    except Exception as e:  # noqa: BLE001
        raise BoardError(f"tracker {host}:{port}: no valid answer ({_last_line(e)})") from None
    if key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise BoardError(f"tracker {host}:{port}: no board registered under key '{key}' (keys: {known})")
    # a busy fleet would make request() wait forever: bound it
    tracker._sock.settimeout(TRACKER_REQUEST_TIMEOUT)  # noqa: SLF001 - TrackerSession has no timeout option
    return _with_retry(f"board '{key}' via tracker {host}:{port}",
                       lambda: tracker.request(key, priority=1, session_timeout=session_timeout, max_retry=1))


@dataclass
class BoardSpec:
    """Where to run: `--board HOST:PORT`, `--tracker HOST:PORT --key K`, or a local server."""
    host: str
    port: int
    key: str | None = None          # set: (host, port) is a tracker

    @property
    def description(self) -> str:
        if self.key is not None:
            return f"tracker {self.host}:{self.port} key {self.key}"
        return f"{self.host}:{self.port}"

    def connect(self, session_timeout: float = 0):
        if self.key is not None:
            return connect_tracker(self.host, self.port, self.key, session_timeout)
        return connect_board(self.host, self.port, session_timeout)


# ----------------------------------------------------------------------------- board facts
def board_arch(remote) -> str | None:
    """The board's architecture from the ELF header of its server's executable, None if the
    board does not let us read it (e.g. a C++ RPC server without absolute-path downloads)."""
    try:
        head = bytes(remote.download("/proc/self/exe")[:20])
    except Exception:  # noqa: BLE001
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}")


# ----------------------------------------------------------------------------- the model
class RemoteModel:
    """The compiled library loaded on a board: `run(x)` -> output, `latency_ms(x)`.

    Every remote call runs under a watchdog (`call_with_timeout`); a call that fails or hangs
    triggers one reconnect (bounded retry), a fresh upload and one more try."""

    def __init__(self, board: BoardSpec, library: Path, function: str = "main"):
        self.board, self.library, self.function = board, Path(library), function
        # unique per client and library: boards may be shared
        self.remote_name = f"mixq-{os.getpid()}-{self.library.stat().st_size}-{self.library.name}"
        self.remote = None
        self.arch = None
        self.slowest = 0.0          # seconds of the slowest remote call so far

    def open(self):
        self.remote = self.board.connect()
        self.arch = call_with_timeout(lambda: board_arch(self.remote), CONNECT_TIMEOUT)
        return self

    def load(self):
        """Upload and load the library (after `open` and the caller's arch check)."""
        from tvm import relax

        def upload_and_load():
            self.remote.upload(str(self.library), target=self.remote_name)
            lib = self.remote.load_module(self.remote_name)
            self.dev = self.remote.cpu()
            self.vm = relax.VirtualMachine(lib, self.dev)
        try:
            call_with_timeout(upload_and_load, MIN_CALL_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            raise BoardError(f"board {self.board.description} cannot load {self.library}: "
                             f"{_last_line(e)}") from None
        return self

    def _timed(self, fn, timeout: float):
        t0 = time.time()
        value = call_with_timeout(fn, timeout)
        self.slowest = max(self.slowest, time.time() - t0)
        return value

    def _call(self, what: str, fn, timeout: float | None = None):
        """fn() under the watchdog; on failure reconnect (bounded) and try once more."""
        timeout = timeout or max(MIN_CALL_TIMEOUT, 10 * self.slowest)
        try:
            return self._timed(fn, timeout)
        except BoardError:
            raise
        except Exception as e:  # noqa: BLE001 - RPC failures surface as TVM/OS errors
            reason = _last_line(e)
        try:
            self.open()
            self.load()
        except BoardError as e:
            raise BoardError(f"lost board {self.board.description} during {what} ({reason}); "
                             f"reconnecting failed: {e}") from None
        try:
            return self._timed(fn, timeout)
        except Exception as e:  # noqa: BLE001
            raise BoardError(f"board {self.board.description} failed during {what}, also after a "
                             f"reconnect: {_last_line(e)}") from None

    def run(self, x: np.ndarray, what: str = "a batch") -> np.ndarray:
        import tvm

        def once():
            return self.vm[self.function](tvm.runtime.tensor(x, self.dev)).numpy()
        return self._call(what, once)

    def latency_ms(self, x: np.ndarray, repeat: int, min_ms: float = 10.0) -> list[float]:
        """Per-call times (ms) of `main(x)` measured on the board by `time_evaluator`:
        `repeat` samples, each the mean of `number` calls, `number` chosen so a sample
        takes about `min_ms` (one call per sample for slow programs)."""
        import tvm
        state = {}

        def probe():
            self.vm.set_input(self.function, tvm.runtime.tensor(x, self.dev))
            timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=1)
            return timer(self.function).mean
        one = self._call("the latency measurement", probe)
        state["number"] = int(min(100, max(1, np.ceil(min_ms / max(one * 1e3, 1e-3)))))

        def measure():
            self.vm.set_input(self.function, tvm.runtime.tensor(x, self.dev))
            timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=state["number"], repeat=repeat)
            return [float(t) * 1e3 for t in timer(self.function).results]
        expected = one * state["number"] * repeat
        return self._call("the latency measurement", measure, timeout=max(MIN_CALL_TIMEOUT, 10 * expected))

    def close(self):
        if self.remote is not None:
            try:
                call_with_timeout(lambda: self.remote.remove(self.remote_name), CONNECT_TIMEOUT)
            except Exception:  # noqa: BLE001 - best effort cleanup on the board
                pass
        self.remote = None
