"""The middleware interface moved to proxy/plugin/base.py, part of the plugin surface:
import it from `proxy`. Kept for plugins written against this module."""

from proxy import Handler, Middleware, MiddlewareFactory

__all__ = ["Handler", "Middleware", "MiddlewareFactory"]
