"""The engine's own error: a run cannot start, or a check failed."""


class MigrationError(Exception):
    """A run cannot start or a check failed; the message says why."""


class WorkloadBusy(MigrationError):
    """Another active run has this workload (the API answers 409: try again later)."""
