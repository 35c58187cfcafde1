"""Hybrid methods: compositions of existing methods (``compose``), and the recipes built on it
(``mam``, ``unipelt``) — no layer code of their own."""

from . import compose, mam, unipelt  # noqa: F401
