"""Helpers shared by the test modules."""

import time


def wait_for(predicate, timeout=10, message="condition not met", interval=0.2):
    """Poll predicate until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(message)
