"""A fingerprint of the base an adapter was trained on: architecture, the shapes at its sites,
an exact hash of the targeted weights and a coarse per-tensor sketch (mean, rms).

The hash tells "same weights, bit for bit"; when it differs, the sketch tells "the same model in
another precision or quantization" (close statistics) from "a different model" (not close).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .host import Host
from .linear import dense_copy, is_quantized

SKETCH_TOLERANCE = 0.05  # relative to the tensor's rms; dtype/quantization changes stay well inside


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _site_tensors(model: nn.Module, sites: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for site in sites:
        module = model.get_submodule(site)
        state = module.original_state() if isinstance(module, Host) else dict(module.state_dict())
        base = module.base_layer if isinstance(module, Host) else module
        if is_quantized(base) and "weight" not in state and not getattr(module, "merged", False):
            # quantized storage has its own tensors; the dequantized weight (in the layout of the layer it
            # stands for) compares with any precision
            state["weight"] = dense_copy(base).weight.detach().float()
        out[site] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


def fingerprint(model: nn.Module, sites: list[str]) -> dict[str, Any]:
    """Fingerprint of `model` at `sites` (module names of the raw model)."""
    digest = hashlib.sha256()
    shapes: dict[str, dict[str, list[int]]] = {}
    sketch: dict[str, dict[str, list[float]]] = {}
    for site, tensors in _site_tensors(model, sites).items():
        shapes[site] = {k: list(v.shape) for k, v in sorted(tensors.items())}
        sketch[site] = {}
        for key, t in sorted(tensors.items()):
            digest.update(f"{site}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(_tensor_bytes(t))
            if t.is_floating_point() and t.numel():
                t64 = t.detach().double()
                sketch[site][key] = [t64.mean().item(), t64.square().mean().sqrt().item()]
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "shapes": shapes,
        "weights_sha256": digest.hexdigest(),
        "sketch": sketch,
    }


def compare(saved: dict[str, Any], model: nn.Module) -> tuple[list[str], list[str]]:
    """(errors, notes) comparing a saved fingerprint with `model`.

    Errors: a missing site or a shape mismatch, or weights whose statistics differ beyond the
    tolerance. Notes: the same weights in another precision (hash differs, sketch matches).
    """
    errors: list[str] = []
    sites = list(saved.get("shapes", {}))
    missing = [s for s in sites if not _has_module(model, s)]
    if missing:
        return [f"the model has no module {missing[0]!r} (and {len(missing) - 1} more sites of the adapter)"], []
    current = fingerprint(model, sites)
    for site, shapes in saved["shapes"].items():
        for key, shape in shapes.items():
            # Only full-precision tensors are comparable; quantized storage has its own shapes.
            comparable = key in current["sketch"][site] and key in saved.get("sketch", {}).get(site, {})
            now = current["shapes"][site].get(key)
            if comparable and now != shape:
                errors.append(f"{site}.{key} has shape {tuple(now)} in the model but {tuple(shape)} in the adapter's base")
    if errors or current["weights_sha256"] == saved.get("weights_sha256"):
        return errors, []
    compared = 0
    for site, stats in saved.get("sketch", {}).items():
        for key, (mean, rms) in stats.items():
            now = current["sketch"].get(site, {}).get(key)
            if now is None:
                continue
            compared += 1
            scale = max(rms, 1e-8)
            if abs(now[1] - rms) > SKETCH_TOLERANCE * scale or abs(now[0] - mean) > SKETCH_TOLERANCE * scale:
                errors.append(f"{site}.{key} differs from the adapter's base (rms {now[1]:.4g} vs {rms:.4g})")
                break
    if errors:
        return errors[:3], []
    if compared == 0:
        return [], ["the base weights could not be compared (different storage); shapes match"]
    return [], ["base weights are not bit-identical to the adapter's base but match statistically "
                "(another dtype or quantization)"]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
