"""Who owns a lab id on this machine: a test session, or a person who made the lab by hand.

Plain Python, no Django: settings_test.py claims its id with it before the
settings exist, and `manage.py lab` uses it too.

A test session holds the id's lock for as long as it runs. A person's lab
(`CRIUWEB_LAB_ID=N manage.py lab up`) holds no lock between commands, so it
leaves a marker instead, which only `lab down` removes. The lock files
themselves stay in /run forever, so they cannot tell a hand-made lab from
one a killed test session left behind; the marker does.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO

RUN = Path("/run")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class LabBusy(Exception):
    """Another process holds the lab id's lock."""


def lock_path(lab_id: int) -> Path:
    return RUN / f"criuweb-testlab-{lab_id}.lock"


def marker_path(lab_id: int) -> Path:
    return RUN / f"criuweb-lab-{lab_id}.hand-made"


def try_lock(lab_id: int) -> IO[str] | None:
    """The id's lock file, open and locked (the lock lasts while it is); None when another process holds it."""
    lock = open(lock_path(lab_id), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _boot_id() -> str:
    return _BOOT_ID.read_text().strip()


def is_hand_made(lab_id: int) -> bool:
    """Whether someone made this id's lab by hand and has not taken it down.

    /run here is no tmpfs: a marker can outlive a reboot, which takes every
    lab with it. It names the boot it was made in, so an old one counts for nothing.
    """
    try:
        return marker_path(lab_id).read_text().strip() == _boot_id()
    except FileNotFoundError:
        return False


def mark_hand_made(lab_id: int) -> None:
    marker_path(lab_id).write_text(_boot_id() + "\n")


def unmark_hand_made(lab_id: int) -> None:
    marker_path(lab_id).unlink(missing_ok=True)


@contextlib.contextmanager
def held(lab_id: int) -> Iterator[None]:
    """Hold the id's lock while a person's `lab up` or `lab down` runs; LabBusy if a test session has it."""
    lock = try_lock(lab_id)
    if lock is None:
        raise LabBusy(
            f"lab {lab_id} is in use: another process holds {lock_path(lab_id)} (a test session, or another "
            f"`manage.py lab` on it); choose another CRIUWEB_LAB_ID"
        )
    with lock:
        yield
