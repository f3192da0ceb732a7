"""Shared by the routes.yaml tests: parse a snippet, and get the errors it reports."""

from __future__ import annotations

from textwrap import dedent

import pytest

from proxy.config.document import ConfigError
from proxy.config.load import parse_config
from proxy.config.model import Config

SOURCE = "routes.yaml"

# The smallest valid file; tests append a `routes:` section or other keys to it.
BASE = """\
listeners: [{bind: ":0"}]
upstreams:
  users: {endpoints: [http://127.0.0.1:8000]}
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(dedent(text), source=SOURCE, env=env or {})


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.errors


def one_error(text: str, env: dict[str, str] | None = None) -> str:
    errors = errors_of(text, env)
    assert len(errors) == 1, errors
    return errors[0]


def routes(text: str) -> str:
    """BASE plus a `routes:` section given as an indented block."""
    return BASE + "routes:\n" + dedent(text)


def route_error(route_lines: str) -> str:
    """The one error of a file whose single route is `route_lines` (starting at line 5)."""
    return one_error(routes("  - " + dedent(route_lines).strip().replace("\n", "\n    ")))
