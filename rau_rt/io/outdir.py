"""The output folder of a run, held exclusively while the run writes into it.

Two runs writing one `--out` interleave `results.jsonl` and overwrite each other's reports,
and both would exit 0. `claim_output` takes an advisory lock on `<out>/.rau-rt.lock`
(`fcntl.flock` on POSIX, `msvcrt.locking` on Windows) for the whole run; the operating system
drops it when the process ends, however it ends, so a crashed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from rau_rt.errors import InputError

LOCK_NAME = ".rau-rt.lock"


@contextlib.contextmanager
def claim_output(out: str | Path) -> Iterator[Path]:
    """Create `out` if needed and hold it for this run.

    Raises:
        InputError: `out` is a file, cannot be created or written, or another run holds it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror}); choose a "
                         "writable folder") from None
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"--out {out}: another rau-rt run (pid {holder}) is writing "
                             "there; wait for it or choose another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
