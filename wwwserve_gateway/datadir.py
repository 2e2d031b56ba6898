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
