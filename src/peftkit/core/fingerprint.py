"""A fingerprint of the base an adapter was trained on, covering exactly what the adapter does not
carry: the model type and geometry, the shapes at its sites, an exact hash of the targeted weights
and a coarse per-tensor sketch (mean, rms).

Sites the adapter stores whole (a task head, ``trainable_modules``, tuned norms or blocks: the select
form's full copies) are left out of the hash and the sketch: their base values are never used, and a
new task head is freshly (randomly) initialised on every load. The hash tells "same weights, bit for
bit"; when it differs, the sketch tells "the same model in another precision or quantization" (close
statistics) from "a different model" (not close). The hashed tensors' dtypes are recorded too, so a
base trained in lower precision (``--precision bf16`` loads it so) is recognised bit for bit in the
precision it was stored in: the same weights, cast the way the trainer cast them, hash the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .host import Host
from .linear import dense_copy, is_quantized

SKETCH_TOLERANCE = 0.05  # relative to the tensor's rms; dtype/quantization changes stay well inside
CASTS = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}  # what a recorded dtype may name
GEOMETRY = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _site_tensors(model: nn.Module, sites: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
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


def geometry(model: nn.Module) -> dict[str, int]:
    """The sizes in the model's config that any adapter depends on."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return {k: v for k in GEOMETRY if isinstance(v := getattr(config, k, None), int) and not isinstance(v, bool)}


def _digest(tensors: dict[str, dict[str, torch.Tensor]], whole: set[str],
            dtypes: dict[str, dict[str, str]] | None = None) -> str:
    """The exact hash of the sites not stored whole; with `dtypes`, each float tensor first cast to the
    dtype recorded for it."""
    digest = hashlib.sha256()
    for site, by_key in tensors.items():
        if site in whole:
            continue
        for key, t in sorted(by_key.items()):
            recorded = (dtypes or {}).get(site)
            cast = recorded.get(key) if isinstance(recorded, dict) else None
            if cast in CASTS and t.is_floating_point() and str(t.dtype) != cast:
                t = t.to(CASTS[cast])
            digest.update(f"{site}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def fingerprint(model: nn.Module, sites: list[str], whole: Iterable[str] = ()) -> dict[str, Any]:
    """Fingerprint of `model` at `sites` (module names of the raw model); `whole` are the sites the
    adapter stores whole, whose shapes are recorded but not their values."""
    whole = set(whole)
    tensors = _site_tensors(model, sites)
    shapes = {site: {k: list(v.shape) for k, v in sorted(by_key.items())} for site, by_key in tensors.items()}
    sketch: dict[str, dict[str, list[float]]] = {}
    dtypes: dict[str, dict[str, str]] = {}
    for site, by_key in tensors.items():
        if site in whole:
            continue
        sketch[site], dtypes[site] = {}, {}
        for key, t in sorted(by_key.items()):
            dtypes[site][key] = str(t.dtype)
            if t.is_floating_point() and t.numel():
                t64 = t.detach().double()
                sketch[site][key] = [t64.mean().item(), t64.square().mean().sqrt().item()]
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "geometry": geometry(model),
        "shapes": shapes,
        "whole": sorted(whole & set(shapes)),
        "weights_sha256": _digest(tensors, whole),
        "dtypes": dtypes,
        "sketch": sketch,
    }


def _model_errors(saved: dict[str, Any], model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    kind, theirs = getattr(config, "model_type", None), saved.get("model_type")
    if kind and theirs and kind != theirs:
        return [f"it was trained on a {saved.get('architecture')} ({theirs}) model, and this is a "
                f"{type(model).__name__} ({kind}) model"]
    now = geometry(model)
    return [f"{key} is {value} in the adapter's base but {now[key]} here" for key, value in
            (saved.get("geometry") or {}).items() if key in now and now[key] != value]


def compare(saved: dict[str, Any], model: nn.Module, whole: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(errors, notes) comparing a saved fingerprint with `model`.

    Errors: another model type or geometry, a missing site or a shape mismatch, or weights whose
    statistics differ beyond the tolerance. Notes: the same weights in another precision (hash
    differs, sketch matches). `whole` adds sites stored whole for files that predate the
    fingerprint's own record of them.
    """
    errors = _model_errors(saved, model)
    if errors:
        return errors, []
    sites = list(saved.get("shapes", {}))
    missing = [s for s in sites if not _has_module(model, s)]
    if missing:
        return [f"the model has no module {missing[0]!r} (and {len(missing) - 1} more sites of the adapter)"], []
    whole = set(saved.get("whole") or ()) | set(whole)
    current = fingerprint(model, sites, whole)
    for site, shapes in saved["shapes"].items():
        for key, shape in shapes.items():
            # Only full-precision tensors are comparable; quantized storage has its own shapes.
            comparable = key in current["sketch"].get(site, {}) and key in saved.get("sketch", {}).get(site, {})
            now = current["shapes"][site].get(key)
            if comparable and now != shape:
                errors.append(f"{site}.{key} has shape {tuple(now)} in the model but {tuple(shape)} in the adapter's base")
    if errors or current["weights_sha256"] == saved.get("weights_sha256"):
        return errors, []
    recorded = saved.get("dtypes")
    if isinstance(recorded, dict) and recorded != current["dtypes"] and _digest(
            _site_tensors(model, sites), whole, recorded) == saved.get("weights_sha256"):
        return [], []  # the same weights, which the adapter's run held in lower precision
    compared, exact = 0, True
    for site, stats in saved.get("sketch", {}).items():
        if site in whole:
            continue
        for key, (mean, rms) in stats.items():
            now = current["sketch"].get(site, {}).get(key)
            if now is None:
                continue
            compared += 1
            exact = exact and math.isclose(now[0], mean, rel_tol=1e-12) and math.isclose(now[1], rms, rel_tol=1e-12)
            scale = max(rms, 1e-8)
            if abs(now[1] - rms) > SKETCH_TOLERANCE * scale or abs(now[0] - mean) > SKETCH_TOLERANCE * scale:
                errors.append(f"{site}.{key} differs from the adapter's base (rms {now[1]:.4g} vs {rms:.4g})")
                break
    if errors:
        return errors[:3], []
    if compared == 0:
        return [], ["the base weights could not be compared (different storage); shapes match"]
    if exact:  # a file that hashed a site it stores whole: every site it depends on is unchanged
        return [], []
    return [], ["base weights are not bit-identical to the adapter's base but match statistically "
                "(another dtype or quantization)"]


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
