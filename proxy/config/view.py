"""The running config as the admin listener's /config shows it: the YAML as loaded, as
JSON, with every value that may be a secret replaced by "<redacted>".

What is hidden:
- by position, whatever the key is called: the values the loader marked while reading the
  file (`Config.concealed`): every header value a middleware sends (`headers`' set and
  add, a plugin's `options.header_values` / `options.conceal`) and every value and regex
  a route matches headers or query parameters on;
- by key name: everything under a key that names a credential (`keys`, `users`,
  `password`, `secret`, `token`, `Authorization`, `cookie`, TLS `key`...);
- in every URL anywhere: the userinfo (`redis://user:password@host`) and each query
  parameter's value (`?access_token=...`), keeping the parameter names.

A string tagged `!public` in the file is shown as written, wherever it is: the operator's
word that it is no secret (`X-Env: !public prod`).

`${VAR}` references are shown as written (the name of a variable is not a secret, and it
tells an operator where a value comes from); the values they stand for never appear,
since this is the document before substitution. A default written in the file
(`${VAR:-default}`) is a literal like any other, so where values are hidden it is too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.document import Document, compose_document

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


class _Public(str):
    """A string the file tagged `!public`: shown as written."""


_PUBLIC_VIEW_TAG = "tag:gatehouse,2025:public"
_STR_TAG = "tag:yaml.org,2002:str"


class _ViewLoader(yaml.SafeLoader):
    """SafeLoader that keeps dates as the text written, as the config reader takes them
    (a date is not JSON), and builds `!public` strings as _Public."""


def _text(loader: _ViewLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


def _public(loader: _ViewLoader, node: yaml.ScalarNode) -> _Public:
    return _Public(loader.construct_scalar(node))


_ViewLoader.add_constructor("tag:yaml.org,2002:timestamp", _text)
_ViewLoader.add_constructor(_PUBLIC_VIEW_TAG, _public)


def config_view(text: str, source: str, concealed: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The document `text` (already validated) with secrets redacted, and where it came
    from. `concealed` holds the start offsets of the values hidden by position (the
    Config's `concealed`, loaded from this same text)."""
    document = compose_document(text, source)  # the loader's own limits; valid already
    _mark(document, concealed)
    loader = _ViewLoader("")
    try:
        data = loader.construct_document(document.root) if document.root is not None else None
    finally:
        loader.dispose()
    if isinstance(data, dict):
        data = {
            key: (
                {name: redact(item) for name, item in value.items()}
                if key in _NAMED_SECTIONS and isinstance(value, dict)
                else redact(value, _is_secret(key))
            )
            for key, value in data.items()
        }
    return {
        "source": source,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": data,
    }


def _mark(document: Document, concealed: frozenset[int]) -> None:
    """Give public scalars the tag that builds them as _Public, and replace concealed ones
    by what is shown of them (an alias shares its node, so it is hidden too)."""
    pending: list[Node] = [document.root] if document.root is not None else []
    seen: set[int] = set()
    while pending:  # iterative: aliases make a graph, and a wide one
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            pending += node.value
        elif isinstance(node, MappingNode):
            pending += [part for pair in node.value for part in pair]
        elif isinstance(node, ScalarNode):
            index = node.start_mark.index
            if index in document.public:
                node.tag = _PUBLIC_VIEW_TAG
            elif index in concealed:
                node.tag, node.value = _STR_TAG, str(_hidden(node.value))


def redact(value: Any, secret: bool = False) -> Any:
    """`value` with what sits under a secret-looking key replaced, and the userinfo and
    query values of any URL (`redis://user:password@host`, `?token=...`); a _Public
    string as it is."""
    if isinstance(value, _Public):
        return str(value)
    if isinstance(value, dict):
        return {key: redact(item, secret or _is_secret(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    if secret:
        return _hidden(value)
    if isinstance(value, str) and "://" in value:
        return _url_shown(value)
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


def _url_shown(url: str) -> str:
    """`url` with its userinfo (user and password) and the value of each query parameter
    hidden (`${VAR}` ones shown); the fragment, never sent, stays."""
    scheme, _, rest = url.partition("://")
    if not _URL_SCHEME.fullmatch(scheme):
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        shown = str(_hidden(user)) if user else ""
        if colon:
            shown += ":" + (str(_hidden(password)) if password else "")
        authority = f"{shown}@{host}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_mark, fragment = query.partition("#")
        query = "&".join(_parameter_shown(part) for part in query.split("&"))
        tail = f"{path}?{query}{hash_mark}{fragment}"
    return f"{scheme}://{authority}{tail}"


def _parameter_shown(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if not equals:  # `?s3cr3t`: a bare value
        return str(_hidden(name)) if name else name
    return f"{name}={_hidden(value)}" if value else parameter
