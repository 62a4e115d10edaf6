"""How a training process lives and dies with the others of its run: parent-death signals and the
output-folder lock.

A stage runs as   run_<stage>.sh (bash) -> pipeline.run.launch (torch's elastic agent) -> worker(s).
torch starts each worker in a session of its own, so a kill of the shell's process group never
reaches it. Each link therefore asks Linux for a parent-death signal (prctl PR_SET_PDEATHSIG):
SIGTERM when its parent goes, whatever killed the parent (SIGKILL included). For a worker, SIGTERM
means "save a checkpoint at the end of this step and stop" (pipeline/run/checkpoints.py).

The lock keeps a second trainer out of a folder another one is writing: global rank 0 holds an flock
on OUTPUT_DIR/.pipeline_lock for as long as its process lives; the kernel drops it when the process
ends, however it ends, so a stale file never blocks a rerun.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Each link of the chain sets this for its children to the pid they should have as parent (see
# die_with_parent).
PARENT_PID_ENV = "PIPELINE_PARENT_PID"
LOCK_NAME = ".pipeline_lock"


def _prctl_pdeathsig(sig: int) -> bool:
    """Set this process's parent-death signal; False where Linux's prctl is not there (macOS,
    Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Get `sig` when the parent process dies. Returns whether the signal could be set up.

    A parent that dies before prctl takes effect never sends the signal, so after the call the
    parent is checked: if it is not the one this process had, the signal is raised now. The one it
    had is the pid in PARENT_PID_ENV when that process is gone already (this process was reparented
    before it could look), else the parent seen before the call; a PARENT_PID_ENV of a live process
    that is not the parent (a value inherited from elsewhere) is ignored.
    """
    expected = os.getppid()
    named = os.environ.get(PARENT_PID_ENV, "")
    if named.isdigit() and int(named) != expected and not _alive(int(named)):
        expected = int(named)  # the named parent died before we even looked
    if not _prctl_pdeathsig(sig):
        return False
    if os.getppid() != expected:
        os.kill(os.getpid(), sig)
    return True


def die_with_launcher() -> None:
    """In a worker started by torchrun or pipeline.run.launch, end with the launcher (see the module
    doc)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGTERM)


class _Lock:
    """One held output-folder lock: the open file (its flock lives as long as the file stays
    open)."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self.fd, self.created = path, fd, created
        self.pid = os.getpid()  # a forked child shares the lock but must not remove it

    def still_ours(self) -> bool:
        """Whether the file at the path is the one we locked (a test may have deleted the folder
        since)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def release(self) -> None:
        """Remove the file (while still holding it, so nobody locks the unlinked one), and any
        folder this process created for it that is still empty: a run that stopped early leaves
        nothing behind."""
        if os.getpid() != self.pid:
            return
        if self.still_ours():
            os.unlink(self.path)
        os.close(self.fd)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break


_held: dict[Path, _Lock] = {}


def _describe(text: str) -> str:
    try:
        owner = json.loads(text)
        return (
            f"pid {owner['pid']} on {owner['host']} "
            f"(started {owner['started']}: {owner['command']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file could not be read)"


def lock_output_dir(output_dir: str) -> None:
    """Hold OUTPUT_DIR/.pipeline_lock for the rest of this process; a UserError when another process
    holds it.

    Called again for a folder this process already holds (stages run in-process in tests), it does
    nothing.
    """
    folder = Path(output_dir).absolute()
    path = folder / LOCK_NAME
    held = _held.get(path)
    if held is not None:
        if held.still_ours():
            return
        held.release()
        del _held[path]
    created = [
        p for p in (folder, *folder.parents) if not p.exists()
    ]  # deepest first, for release()
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"--output_dir {folder} is in use by another training run, {_describe(owner)}; "
                "wait for it to finish or stop it (SIGTERM: it saves a checkpoint and exits), or "
                "give another --output_dir."
            ) from None
        lock = _Lock(path, fd, created)
        if lock.still_ours():
            break
        os.close(fd)  # the holder before us removed the file as we opened it: lock the new one
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    _held[path] = lock


@atexit.register
def _release_all() -> None:
    for lock in _held.values():
        lock.release()
    _held.clear()
