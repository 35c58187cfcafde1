"""Reparameterized methods: a low-rank (or otherwise structured) update foldable into W."""

from . import (
    adalora,  # noqa: F401
    lora,  # noqa: F401
)
