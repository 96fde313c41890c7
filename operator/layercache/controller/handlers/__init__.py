"""kopf handlers: thin, they only call the `Controller`. Importing registers them."""

from layercache.controller.handlers import caches, lifecycle, watches

__all__ = ["caches", "lifecycle", "watches"]
