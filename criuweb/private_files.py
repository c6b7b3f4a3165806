"""Files only this server's user may read: the secret key, the database, the admin's password.

Kept free of Django imports so that settings.py can use it before Django is set up.
"""

import os
import secrets
from pathlib import Path


def private_dir(path: Path) -> Path:
    """The directory, made if need be, with mode 0700 (also when it was there before)."""
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, text: str, replace: bool = True) -> bool:
    """Write text to path with mode 0600, atomically; return whether this call wrote it.

    The bytes go to a new file created 0600 (O_EXCL: never an existing file or
    a symlink planted in its place), which then takes the final name, so no
    reader ever sees a partial file or one readable by others. With
    replace=False an existing file wins (a link, not a rename, cannot
    overwrite), so two processes starting at once agree on one content.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def make_private(path: Path) -> None:
    """Take group and other permissions away from an existing file of ours."""
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
