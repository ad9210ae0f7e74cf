"""Writing artifacts: the one place every stage writes files and directories through.

Each artifact is written under a temporary name beside its destination and renamed into place
only once it is complete, so a failed or killed command leaves nothing half-written and the
previous artifact stays intact until the new one is whole; the temporary is removed on any
failure. A full disk ends as one line, `no space left on device writing PATH`, raised as the
calling stage's error class (`error=`), and so does a directory the user may not write
(`permission denied writing PATH`). `check_overwritable` refuses to replace a directory that is
not an earlier artifact of the same kind. `DirLock` keeps two mixq processes from writing the
same run, frozen or build directory at once.

Standard library only at import (matplotlib is imported by save_png when called): the integer
graph module (mixq.graph) uses it too."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

# A write that fails while its file system has less than this left is a full disk: torch.save
# and TVM's linker report ENOSPC in their own words, without an errno.
FULL_BELOW_BYTES = 1 << 20


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Did writing under `where` fail because its file system is full?"""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if os.strerror(errno.ENOSPC) in str(exc):
        return True
    free = _free_bytes(Path(where))
    return free is not None and free < FULL_BELOW_BYTES


@contextmanager
def _writing(path: Path, error, cleanup):
    """Run cleanup() when the block fails; a full disk becomes error(one line naming `path`)."""
    try:
        yield
    except BaseException as e:
        full = is_disk_full(e, path.parent)         # before cleanup frees what the write used
        cleanup()
        if full:
            raise error(f"no space left on device writing {path}") from None
        if isinstance(e, PermissionError):
            raise error(f"permission denied writing {path}") from None
        raise


@contextmanager
def atomic_path(path, error):
    """A temporary path beside `path` to write; renamed to `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with _writing(path, error, lambda: tmp.unlink(missing_ok=True)):
        yield tmp
        os.replace(tmp, path)


def write_bytes(path, data: bytes, error):
    with atomic_path(path, error) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str, error):
    with atomic_path(path, error) as tmp:
        tmp.write_text(text)


def torch_save(obj, path, error):
    import torch
    with atomic_path(path, error) as tmp:
        torch.save(obj, tmp)


def save_png(fig, path, error, dpi: int = 110):
    """A matplotlib figure written as PNG to `path` (atomically, as every artifact), then closed."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(path, error) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def check_overwritable(out_dir, is_artifact, what: str, error, label: str = ""):
    """Refuse (error naming `out_dir`, after `label`, e.g. "--out ") to replace anything but an
    empty directory or an earlier artifact of the same kind (`is_artifact(out_dir)`, described
    as `what`): `--out RUN_DIR` or `--out ~` must not wipe a user's files."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise error(f"{label}{out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and not is_artifact(out_dir):
        raise error(f"{label}{out_dir}: exists and is not {what}; refusing to overwrite it")


def replace_dir(tmp: Path, out_dir: Path):
    """Rename `tmp` to `out_dir`; an earlier `out_dir` is removed only after that worked (and
    put back if it failed)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir, error):
    """A new empty directory beside `out_dir` (mode per the umask) to fill; it replaces
    `out_dir` when the block succeeds (replace_dir) and is removed when it fails."""
    out_dir = Path(out_dir)
    tmp = None
    with _writing(out_dir, error, lambda: tmp is not None and shutil.rmtree(tmp, ignore_errors=True)):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~current_umask())          # mkdtemp makes it 0700
        yield tmp
        replace_dir(tmp, out_dir)


# ----------------------------------------------------------------------------- locking
def _inode(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino


def _holder_pid(fd: int) -> str:
    for _ in range(20):                 # the holder writes its pid right after taking the lock
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


class DirLock:
    """An exclusive lock on a directory mixq writes: `.NAME.lock` beside it, flock()ed and
    holding the owner's pid. Another process fails at once with
    `error("DIR: locked by another mixq process (pid N)")`. The kernel drops the lock when its
    process ends, however it ends; `release()` (the end of a `with` block, or the object being
    collected) also removes the file. Taking it again in the same process takes it over (a
    command rerun in one Python session after an error that still holds the first lock)."""
    # lock file (st_dev, st_ino) -> the DirLock holding it in this process (weakly: dropping the
    # last reference to a DirLock releases it)
    _held = weakref.WeakValueDictionary()

    def __init__(self, directory, error):
        self.directory = Path(directory)
        target = self.directory.resolve()
        self.path = target.parent / f".{target.name}.lock"
        self.pid, self.fd = os.getpid(), None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise error(f"{directory}: permission denied writing {self.path.parent}") from None
        while self.fd is None:
            if fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            self.key = _inode(os.fstat(fd))
            mine = DirLock._held.get(self.key)
            if mine is not None and mine.fd is not None:
                os.close(fd)
                self.fd, mine.fd = mine.fd, None
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder_pid(fd)
                os.close(fd)
                raise error(f"{directory}: locked by another mixq process (pid {pid})") from None
            try:
                same = _inode(os.stat(self.path)) == self.key
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:                       # its last holder removed the file meanwhile: open the new one
                os.close(fd)
                fd = None
        DirLock._held[self.key] = self
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{self.pid}\n".encode(), 0)
        except OSError:                 # a full disk: the lock holds, without the pid
            pass

    def release(self):
        if self.fd is None or os.getpid() != self.pid:  # released, or a forked child's copy
            return
        if DirLock._held.get(self.key) is self:
            del DirLock._held[self.key]
        try:
            if _inode(os.stat(self.path)) == self.key:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:       # interpreter shutdown
            pass
