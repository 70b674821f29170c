"""What the jobs share to never leave half-written files and never make one video twice.

- Temporary files are named ``.<tag>.<host>.<pid>.tmp<suffix>`` (:func:`temporary_name`), so a later run can
  tell whose they are: :func:`clear_stale_temporaries` removes those of processes of this host that are gone
  (a ``kill -9`` runs no clean-up), and leaves those of live processes and of other hosts alone.
- :class:`FileLock` is an exclusive ``flock`` on a small file that names its owner (pid, host, what it does).
  The kernel drops the lock when its owner dies, however it dies, so a lock is never stale; the file left
  behind by a killed owner is removed by the next owner or by :func:`clear_stale_temporaries`.
- :func:`is_disk_full` tells a full disk (or quota, or file size limit) from other write errors, and
  :func:`one_line` turns an exception into the one line a user reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")
LOCK_SUFFIX = ".lock"
_TEMP = re.compile(r"^\.[0-9a-f]{16}\.(?P<host>[^/]+)\.(?P<pid>\d+)\.tmp(\.[^/]*)?$")


def host_name() -> str:
    """This machine's name as it goes into file names (dots kept, anything unusual becomes '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"


def temporary_name(tag: str, suffix: str) -> str:
    """``.<tag>.<host>.<pid>.tmp<suffix>``: hidden, unique to this process, and telling whose it is."""
    return f".{tag}.{host_name()}.{os.getpid()}.tmp{suffix}"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch), None when it does not exist."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks since boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0  # alive, start unknown: treat it as the owner


def owner_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this host exists and was already running at time ``since`` (a pid that
    was reused by a process started later is not the owner)."""
    start = _process_start(pid)
    return start is not None and start <= since + 1.0


def clear_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove, under ``folder`` (recursively), the temporary files and unlocked lock files that processes of
    this host left when they died; return what was removed. Files of live processes, of other hosts and any
    other file are left alone."""
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    me = host_name()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            m = _TEMP.match(name)
            if m is not None and m["host"] == me:
                try:
                    if owner_alive(int(m["pid"]), path.stat().st_mtime):
                        continue
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:
                    continue
            elif name.endswith(LOCK_SUFFIX) and Path(dirpath).name == "locks":
                if FileLock(path).remove_if_free():
                    removed.append(path)
    return removed


class FileLock:
    """An exclusive, non-waiting (or waiting) lock on ``path``, whose content names the owner.

    ``acquire()`` returns None when this process now holds the lock, else the owner's record
    ``{"pid", "host", "label", "since"}`` (as much of it as could be read). ``release()`` removes the file and
    drops the lock. A holder that dies drops the lock with it (the kernel closes its files).
    Raises OSError when the filesystem does not support locks (ENOLCK).
    """

    def __init__(self, path: str | os.PathLike, label: str = ""):
        self.path = Path(path)
        self.label = label
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False) -> dict | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another process removed the empty folder in between
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                return owner
            except BaseException:
                os.close(fd)
                raise
            if not self._same_file(fd):  # the owner before us removed it while we waited: take the new one
                os.close(fd)
                continue
            record = {"pid": os.getpid(), "host": host_name(), "label": self.label,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
            return None

    def _same_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: a waiter on the old file sees it is gone and retries
        os.close(self._fd)
        self._fd = None

    def remove_if_free(self) -> bool:
        """Remove the lock file when nobody holds it (left by a killed owner); True when removed."""
        try:
            if self.acquire() is not None:
                return False
        except OSError:
            return False
        self.release()
        return True

    def __enter__(self) -> FileLock:
        owner = self.acquire()
        if owner is not None:
            raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path} is held by {describe_owner(owner)}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict) -> str:
    """'pid 123 on host a (since 2026-...)' from a lock's owner record."""
    if not owner.get("pid"):
        return "another process"
    text = f"pid {owner['pid']} on host {owner.get('host', '?')}"
    return text + (f" (since {owner['since']})" if owner.get("since") else "")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the quota, or the file size limit) is full: no later write to
    the same place can succeed, so a batch job should stop rather than fail every remaining item."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in DISK_FULL_TEXTS)


def one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line: the message's first non-empty line (tools such as ffmpeg put long
    banners after it), cut at ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


__all__ = [
    "FileLock",
    "clear_stale_temporaries",
    "describe_owner",
    "host_name",
    "is_disk_full",
    "one_line",
    "owner_alive",
    "temporary_name",
]
