"""layercache: plan, pre-pull and de-duplicate shared container-image layers across nodes."""

__version__ = "0.1.0"
