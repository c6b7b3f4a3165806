"""The address a login attempt came from, for django-axes' lockout."""

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str | None:
    """REMOTE_ADDR, or behind the TLS proxy of production mode the address it saw.

    Behind the proxy every request comes from the proxy's address, so locking
    that out would lock everybody out. The proxy appends the address it saw to
    X-Forwarded-For: the last entry is its own, anything before it came from
    the client and could be made up.
    """
    if settings.BEHIND_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")[-1].strip()
        if forwarded:
            return forwarded
    return request.META.get("REMOTE_ADDR")
