"""What may leave the process: values as they can be printed, stored in a manifest or put in a fingerprint."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
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


# `scheme://user:password@host`: whatever sits before the `@` of an authority is a credential
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
# `?api_key=...`, `&token=...`, `&X-Amz-Signature=...`: query values whose names say they are secret
_SECRET_QUERY = re.compile(r"([?&][^=&\s#'\"]*(?:token|key|secret|password|passwd|signature|sig|auth)[^=&\s#'\"]*=)"
                           r"[^&\s#'\"]+", re.IGNORECASE)
MIN_SECRET_CHARS = 4  # shorter `${VAR}` values (`1`, `true`, `en`) would blank out unrelated text
# Environment variables holding credentials: a Modal Secret reaches a container as such variables (HF_TOKEN from the
# `huggingface` secret), and locally HF_TOKEN, MODAL_TOKEN_SECRET... are set the same way.
_SECRET_ENV = re.compile(r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIALS?|AUTH)(?:_|$)",
                         re.IGNORECASE)
MIN_ENV_SECRET_CHARS = 8


def secret_environment() -> dict[str, str]:
    """The environment variables whose names say they hold a credential, with their values."""
    return {name: value for name, value in os.environ.items()
            if _SECRET_ENV.search(name) and len(value) >= MIN_ENV_SECRET_CHARS}


def scrub(text: str, variables: Mapping[str, str] | None = None) -> str:
    """`text` with URL credentials and secret query values masked (`***`), and the value of every `${VAR}` the
    spec used, or of a credential variable of the environment (`secret_environment`), written back as `${VAR}`:
    what may go into a manifest, a log line or a generated file."""
    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
    for name, value in sorted({**secret_environment(), **(variables or {})}.items(), key=lambda kv: -len(kv[1])):
        if len(value) >= MIN_SECRET_CHARS:
            text = text.replace(value, "${" + name + "}")
    return text


def public_record(obj: Any, variables: Mapping[str, str] | None = None) -> Any:
    """A JSON-able record with every string passed through `scrub` (keys and non-strings kept)."""
    if isinstance(obj, str):
        return scrub(obj, variables)
    if isinstance(obj, dict):
        return {key: public_record(value, variables) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [public_record(value, variables) for value in obj]
    return obj
