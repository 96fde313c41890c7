"""kopf handlers: parse the event, call the reconciler, report. Importing registers them."""

from layercache.handlers import caches, lifecycle, watches

__all__ = ["caches", "lifecycle", "watches"]
