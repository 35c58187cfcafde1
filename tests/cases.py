"""The contract-suite table: which (method, model, options) cases run through the shared checks.

Every registered method runs with its default options on every transformer model below, so a
new method joins the suite by being registered. Add variants or plain-module options here.
"""

from __future__ import annotations

import pytest

import peftkit

TRANSFORMERS = ("bert", "llama", "gpt2")

VARIANTS: dict[str, list[dict]] = {
    "lora": [{}, {"rslora": True, "r": 4}, {"dora": True}, {"targets": "all-linear", "bias": "lora_only"}],
    "adalora": [{"total_steps": 20}, {"total_steps": 20, "init_r": 4, "target_r": 2, "targets": "all-linear"}],
}

# Options that make a method work on the plain nn.Module of models.PlainNet (no transformer structure).
PLAIN: dict[str, dict] = {
    "lora": {"targets": ["fc1", "fc2", "embed"]},
    "adalora": {"targets": ["fc1", "fc2"], "total_steps": 20},
}


def contract_cases() -> list:
    out = []
    for method in peftkit.methods():
        for i, options in enumerate(VARIANTS.get(method, [{}])):
            for model in TRANSFORMERS:
                out.append(pytest.param(method, model, options, id=f"{method}{i}-{model}"))
        if method in PLAIN:
            out.append(pytest.param(method, "plain", PLAIN[method], id=f"{method}-plain"))
    return out
