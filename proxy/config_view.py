"""The running config as the admin listener's /config shows it: the YAML as loaded, as
JSON, with every value that may be a secret replaced by "<redacted>".

`${VAR}` references are shown as written (the name of a variable is not a secret, and it
tells an operator where a value comes from); the values they stand for never appear,
since this is the document before substitution. A default written in the file
(`${VAR:-default}`) is a literal like any other, so under a secret key it is redacted too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

REDACTED = "<redacted>"
# Keys whose values are credentials in some middleware or listener: API keys, basic-auth
# users, JWT secrets, headers a route sets or matches (Authorization, X-API-Key,
# Proxy-Authorization), TLS private keys.
_SECRET_KEY = re.compile(
    r"(^|[_-])(keys?|passwords?|secrets?|tokens?|users|credentials|authorization|cookie)$",
    re.IGNORECASE,
)
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}$")
# Sections whose keys are names the file chose (an upstream `users`, a middleware `keys`),
# not options: a name says nothing about whether what it names is a secret.
_NAMED_SECTIONS = ("upstreams", "middleware")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


class _ViewLoader(yaml.SafeLoader):
    """SafeLoader that keeps dates as the text written, as the config reader takes them
    (a date is not JSON)."""


def _text(loader: _ViewLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_ViewLoader.add_constructor("tag:yaml.org,2002:timestamp", _text)


def config_view(text: str, source: str) -> dict[str, Any]:
    """The document `text` (already validated) with secrets redacted, and where it came from."""
    document = yaml.load(text, Loader=_ViewLoader)  # a SafeLoader: plain data only
    if isinstance(document, dict):
        document = {
            key: (
                {name: redact(item) for name, item in value.items()}
                if key in _NAMED_SECTIONS and isinstance(value, dict)
                else redact(value, _is_secret(key))
            )
            for key, value in document.items()
        }
    return {
        "source": source,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": document,
    }


def redact(value: Any, secret: bool = False) -> Any:
    """`value` with what sits under a secret-looking key replaced, and the password of
    any URL (`redis://user:password@host`)."""
    if isinstance(value, dict):
        return {key: redact(item, secret or _is_secret(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    if secret:
        return _hidden(value)
    if isinstance(value, str) and "://" in value:
        return _without_password(value)
    return value


def _is_secret(key: object) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def _hidden(value: object) -> object:
    """A secret as shown: a `${VAR}` reference as written (its default redacted), else
    REDACTED."""
    reference = _ENV_REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if reference is None:
        return REDACTED
    if reference.group(2) not in (None, ":-"):
        return f"${{{reference.group(1)}:-{REDACTED}}}"
    return value


def _without_password(url: str) -> str:
    """`url` with the password of its userinfo hidden (a `${VAR}` one is shown)."""
    scheme, _, rest = url.partition("://")
    if not _URL_SCHEME.fullmatch(scheme):
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return url
    return f"{scheme}://{user}:{_hidden(password)}@{host}{rest[end:]}"
