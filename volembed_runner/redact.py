"""What may leave the process: values as they can be printed, stored in a manifest or put in a fingerprint."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def public_url(url: str) -> str:
    """`url` without credentials, query or fragment: safe to print and to put in a fingerprint."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: keep what was written after the host, it holds no credentials
        port = parts.netloc.rpartition(":")[2]
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
