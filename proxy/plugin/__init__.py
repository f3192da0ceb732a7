"""The middleware interface (base.py) and the options reader (options.py): the part of
the plugin surface that is about being a middleware. Import them from `proxy`, as
everything of the surface (proxy/__init__.py)."""
