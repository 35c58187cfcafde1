"""Load a Hugging Face model folder straight into quantized form, one tensor at a time.

The model is built with its parameters on the meta device (no memory), the target linear layers
are replaced by empty `QuantLinear` layers, and the safetensors checkpoint is then read tensor by
tensor: a target weight is quantized as soon as it is read and its full-precision copy dropped;
every other tensor is put in place. Files are read with ``pread`` rather than mapped, and freed
heap memory is handed back to the OS as it goes, so the resident set stays near the quantized
model plus the largest single tensor (the full-precision model is never held at once).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.linear import LINEAR_TYPES, Conv1D
from ..core.targets import LayerSpec, Spec, iter_sites, select, set_site
from ..errors import PeftkitError
from . import backends, memory
from .linear import QuantLinear
from .spec import QuantSpec, parse_dtype

TASKS = ("causal-lm", "classification")
_IGNORED_SUFFIXES = (".position_ids", ".inv_freq")  # buffers older checkpoints saved
_RELEASE_EVERY = 64 << 20  # bytes read between two malloc_trim calls


class LoadError(PeftkitError, OSError):
    """A model folder cannot be loaded into quantized form."""


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside go to the meta device as they are registered (buffers stay
    real, so computed ones like rotary frequencies keep their values); their init then costs nothing."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise LoadError(f"{folder} has no model.safetensors (or sharded index); load_quantized reads safetensors "
                    "checkpoints only. Re-save the model with save_pretrained(safe_serialization=True).")


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.8 has only memory-mapped reads
        handle = safe_open(str(path), framework="pt", device="cpu")
    with handle as f:
        yield f


def _model_class(config: Any, task: str | None) -> Any:
    import transformers

    if task is None:
        archs = getattr(config, "architectures", None) or []
        task = "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "classification"
    if task not in TASKS:
        raise LoadError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    return transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification


def _skeleton(folder: Path, task: str | None, model_class: Any, config_overrides: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), **config_overrides)
    except (OSError, ValueError) as err:
        raise LoadError(f"cannot read the model config in {folder}: {str(err).splitlines()[0]}") from None
    cls = model_class or _model_class(config, task)
    with _parameters_on_meta():
        model = cls.from_config(config)
    model.config._name_or_path = str(folder)
    return model


def _placeholders(model: nn.Module, spec: QuantSpec, compute_dtype: torch.dtype | None, dtype: torch.dtype | None,
                  targets: Spec, exclude: Spec, layers: LayerSpec) -> dict[str, QuantLinear]:
    """Swap each target linear layer for an empty QuantLinear; returns them by weight key."""
    sites = select(model, targets, exclude=exclude, layers=layers, accept=lambda m: isinstance(m, LINEAR_TYPES),
                   accept_label="nn.Linear and Conv1D layers")
    modules = dict(iter_sites(model))
    out = {}
    for site in sites:
        module = modules[site]
        if not isinstance(module, LINEAR_TYPES):
            continue
        conv1d = isinstance(module, Conv1D)
        in_f, out_f = module.weight.shape if conv1d else module.weight.shape[::-1]
        layer = QuantLinear(in_f, out_f, spec, bias=module.bias, compute_dtype=compute_dtype,
                            weight_dtype=dtype or module.weight.dtype, conv1d=conv1d, device="meta")
        set_site(model, site, layer)
        out[f"{site}.weight"] = layer
    return out


def _resolve(key: str, names: Container[str], prefix: str) -> str | None:
    """The model's name for checkpoint `key` (a base-model checkpoint lacks the task model's prefix)."""
    for candidate in (key, f"{prefix}.{key}" if prefix else key,
                      key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key):
        if candidate in names:
            return candidate
    return None


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    owners = {}
    for name, module in model.named_modules():
        for attr in (*module._parameters, *module._buffers):
            owners[f"{name}.{attr}" if name else attr] = (module, attr)
    return owners


def _put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def _stream(model: nn.Module, files: list[Path], quantized: dict[str, QuantLinear], dtype: torch.dtype | None,
            device: torch.device) -> tuple[set[str], list[str]]:
    owners = _owners(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded, unexpected = set(), []
    since_release = 0
    for path in files:
        with _open(path) as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                weight_key = _resolve(key, quantized, prefix)
                target = weight_key or _resolve(key, owners, prefix)
                if target is None:
                    if not key.endswith(_IGNORED_SUFFIXES):
                        unexpected.append(key)
                    continue
                tensor = f.get_tensor(key).to(device)  # quantized where it will run
                since_release += tensor.numel() * tensor.element_size()
                if weight_key is not None:
                    layer = quantized[weight_key]
                    layer.weight_dtype = dtype or tensor.dtype
                    layer.load_dequantized_weight(tensor.T if layer.conv1d else tensor)
                else:
                    module, attr = owners[target]
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    _put(module, attr, tensor)
                loaded.add(target)
                del tensor
                if weight_key is not None or since_release > _RELEASE_EVERY:
                    memory.release()  # the fp32 copy and the quantization temporaries
                    since_release = 0
    memory.release()
    return loaded, unexpected


def _finish(model: nn.Module, quantized: dict[str, QuantLinear], loaded: set[str]) -> list[str]:
    """Tie shared weights, initialise what the checkpoint lacks (a new task head); returns those names."""
    empty = [k for k, layer in quantized.items() if k not in loaded]
    if empty:
        raise LoadError(f"the checkpoint has no weight for {len(empty)} quantized layer(s), e.g. {empty[:3]}; "
                        "it does not match the model config.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = []
    for name, module in model.named_modules():
        meta = [a for a, p in (*module._parameters.items(), *module._buffers.items()) if p is not None and p.is_meta]
        if not meta:
            continue
        missing += [f"{name}.{a}" for a in meta]
        for attr in meta:
            value = getattr(module, attr)
            _put(module, attr, torch.empty_like(value, device="cpu"))
        init = getattr(model, "_init_weights", None)
        if callable(init):
            init(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return missing


def load_quantized(path: str | Path, scheme: str = "nf4", *, task: str | None = None, model_class: Any = None,
                   double_quant: bool = True, blocksize: int = 64, compute_dtype: torch.dtype | str | None = None,
                   targets: Spec = "all-linear", exclude: Spec = None, layers: LayerSpec = None,
                   backend: str = "torch", dtype: torch.dtype | str | None = None,
                   device: torch.device | str = "cpu",
                   **config_overrides: Any) -> nn.Module:
    """A Hugging Face model from `path` with its linear layers quantized while loading.

    Peak memory stays near the quantized model plus one tensor: no full-precision copy of the
    model is ever built. The result equals ``peftkit.quantize(from_pretrained(path), scheme, ...)``.

    Args:
        task: "causal-lm" or "classification" (default: from the config's architectures).
        model_class: a transformers ``AutoModelFor...`` or model class instead of `task`.
        dtype: dtype of the layers that stay in full precision (default: as stored).
        device: where the model goes; each tensor is moved there as it is read, then quantized
            there (so with "cuda" only the quantized model plus one tensor ever sits on the GPU).
        config_overrides: passed to ``AutoConfig.from_pretrained`` (e.g. ``num_labels=2``).
        The other options are those of `peftkit.quantize`.

    Raises:
        LoadError: no config or safetensors checkpoint, or a checkpoint that does not fit.
        ConfigError / TargetError: as `peftkit.quantize`.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder} is not a Hugging Face model folder (no config.json).")
    spec = QuantSpec(scheme, double_quant, blocksize, backend)
    backends.check_available(spec)
    files = _checkpoint_files(folder)
    model = _skeleton(folder, task, model_class, config_overrides)
    quantized = _placeholders(model, spec, parse_dtype(compute_dtype), parse_dtype(dtype, "dtype"),
                              targets, exclude, layers)
    loaded, unexpected = _stream(model, files, quantized, parse_dtype(dtype, "dtype"), torch.device(device))
    _finish(model, quantized, loaded)
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} checkpoint tensor(s) fit no module of "
                      f"{type(model).__name__} and were skipped, e.g. {unexpected[:3]}", stacklevel=2)
    _generation_config(model, folder)
    return model.to(device).eval()  # the few tensors built in place (buffers, a new head)


def _generation_config(model: nn.Module, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
