"""peftkit's version: one place, readable by every part of the package without importing its root."""

__version__ = "0.1.0"
