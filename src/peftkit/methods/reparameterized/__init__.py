"""Reparameterized methods: a low-rank (or otherwise structured) update foldable into W."""

from . import lora  # noqa: F401
