"""The node's data dir is private to its user: the directory 0700, what is in it 0600 (or 0700).

It holds the identity key, the ledger database with its -wal and -shm files, and backend logs. The
`node` command sets the process umask to 077, so everything the node creates (SQLite's side files
and log files included) is private from the start, and tightens an existing data dir that is not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from wwwserve_gateway.network.identity import KEY_FILE

PRIVATE_UMASK = 0o077


def make_private(data_dir: Path) -> list[str]:
    """Create `data_dir` (0700) or take group and other permissions off it and everything in it.

    Returns what was changed, as 'path: old -> new' lines. Symbolic links are not followed. The
    identity key is left alone: one readable by others may have been copied, and the node refuses
    to start with it (NodeIdentity.load) until its owner decides.
    """
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        return []
    changed: list[str] = []
    _tighten(data_dir, changed)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            if path.parent == data_dir and name == KEY_FILE:
                continue
            _tighten(path, changed)
    return changed


def _tighten(path: Path, changed: list[str]) -> None:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode) or not mode & 0o077:
        return
    old = stat.S_IMODE(mode)
    new = old & ~0o077
    try:
        os.chmod(path, new)
    except OSError as exc:  # not ours, say: the log says so, the node goes on
        changed.append(f"{path}: left at {old:o} ({exc.strerror})")
        return
    changed.append(f"{path}: {old:o} -> {new:o}")


LOCK_FILE = "node.lock"


class DataDirInUse(RuntimeError):
    """Another process holds this data dir, and with it the node's identity."""


class DataDirLock:
    """An exclusive lock on the data dir for this process's lifetime (released by the kernel when
    the process dies, kill -9 included). Two processes with one identity would sign two different
    operations at the same seq of its ledger chain, and the network bars a forked chain for good."""

    def __init__(self, data_dir: Path) -> None:
        import fcntl

        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"the data dir {data_dir} is in use by another node process (pid {holder}): two "
                "processes with one identity would fork its ledger chain. Stop the other process, "
                "or give this one its own node.data_dir (and so its own identity)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
