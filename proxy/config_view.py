"""The running config as the admin listener's /config shows it: the YAML as loaded, as
JSON, with every value that may be a secret replaced by "<redacted>".

`${VAR}` references are shown as written (the name of a variable is not a secret, and it
tells an operator where a value comes from); the values they stand for never appear,
since this is the document before substitution.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

REDACTED = "<redacted>"
# Keys whose values are credentials in some middleware or listener: API keys, basic-auth
# users, JWT secrets, headers a route sets (Authorization), TLS private keys.
_SECRET_KEY = re.compile(
    r"(^|_)(keys?|passwords?|secrets?|tokens?|users|credentials|authorization|cookie)$",
    re.IGNORECASE,
)
_ENV_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$")


def config_view(text: str, source: str) -> dict[str, Any]:
    """The document `text` (already validated) with secrets redacted, and where it came from."""
    return {
        "source": source,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": redact(yaml.safe_load(text)),
    }


def redact(value: Any, secret: bool = False) -> Any:
    """`value` with what sits under a secret-looking key replaced."""
    if isinstance(value, dict):
        return {
            key: redact(item, secret or bool(_SECRET_KEY.search(str(key))))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    if secret and not (isinstance(value, str) and _ENV_REFERENCE.match(value)):
        return REDACTED
    return value
