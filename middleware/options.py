"""`Options` moved to proxy/plugin/options.py, part of the plugin surface: import it from
`proxy`. Kept for plugins written against this module."""

from proxy import ConfigValueError, Options

__all__ = ["ConfigValueError", "Options"]
