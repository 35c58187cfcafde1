"""Hybrid methods: compositions of existing methods (``compose``), and the recipes built on it."""

from . import compose  # noqa: F401
