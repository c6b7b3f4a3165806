"""What a workload reference may look like, checked before anything is asked of a host.

One place for the web forms, the command line and the engine, so that all
three refuse the same input with the same message. Each check raises
InputError (a ValueError) with a message meant for the person who typed it.
"""

import re

# Docker's own grammar for container names (daemon/names/names.go,
# RestrictedNameChars); a container ID (12 to 64 hex digits) matches it too.
CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# Docker refuses nothing longer itself, but no real name comes near this and the
# run's workload column holds 255 characters.
CONTAINER_NAME_MAX = 255
# The kernel's largest possible pid_max (PID_MAX_LIMIT on 64-bit, 2^22).
PID_MAX = 4 * 1024 * 1024


class InputError(ValueError):
    """A workload reference that cannot be right; the message says why."""


def container_ref(value: object) -> str:
    """A container name or ID as Docker would accept it, returned unchanged."""
    if value is None or value == "":
        raise InputError("Name a container.")
    if not isinstance(value, str):
        raise InputError(f"{value!r} is not a container name.")
    if len(value) > CONTAINER_NAME_MAX:
        raise InputError(f"A container name has at most {CONTAINER_NAME_MAX} characters.")
    # fullmatch, not match: a trailing newline or space is not part of any name.
    if not CONTAINER_NAME.fullmatch(value):
        raise InputError(
            f"{value!r} is not a container name: a name starts with a letter or digit and holds only "
            "letters, digits, '_', '.' and '-'."
        )
    return value


# Docker's grammar for checkpoint names (daemon/checkpoint.go): a kept
# checkpoint's name is also the name of its directory on the host.
CHECKPOINT_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
CHECKPOINT_NAME_MAX = 64


def checkpoint_name(value: object) -> str:
    """A checkpoint name as Docker would accept it, returned unchanged."""
    if not isinstance(value, str) or not value:
        raise InputError("Name the checkpoint.")
    if len(value) > CHECKPOINT_NAME_MAX:
        raise InputError(f"A checkpoint name has at most {CHECKPOINT_NAME_MAX} characters.")
    if not CHECKPOINT_NAME.fullmatch(value):
        raise InputError(
            f"{value!r} is not a checkpoint name: a name starts with a letter or digit and holds only "
            "letters, digits, '_', '.' and '-'."
        )
    return value


def pid(value: object) -> int:
    """A PID given as a plain positive integer (or its decimal digits), never PID 1.

    Nothing is stripped or converted loosely: " 12" could only be 12 after
    guessing, and a guess here points CRIU at another process.
    """
    if value is None or value == "":
        raise InputError("Give the PID of the process tree to move.")
    if isinstance(value, bool):  # bool is an int subclass; True is not PID 1
        raise InputError(f"{value!r} is not a PID.")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[1-9][0-9]*", value, flags=re.ASCII):
        number = int(value)
    else:
        raise InputError(f"{value!r} is not a PID: give a positive whole number, digits only.")
    if number < 1 or number > PID_MAX:
        raise InputError(f"{value!r} is not a PID: PIDs go from 2 to {PID_MAX}.")
    if number == 1:
        raise InputError("PID 1 is the host's init; it cannot be moved.")
    return number
