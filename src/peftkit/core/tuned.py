"""`TunedModel`: what users hold. A frozen model plus named adapters, behaving like the model.

Adapters are attached by method builders (via the registry), installed into `Host` wrappers at
their sites and, for the input/context forms, kept as model-level deltas. All state about which
adapters run lives in one `SiteContext` shared by the hosts. Every operation either completes or
leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import (
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    NotMergeableError,
    QuantizedMergeWarning,
    TargetError,
)
from . import files, registry
from .config import MethodConfig
from .files.checked import fits_dtype
from .forms.select import TrainableCopy
from .host import Host, SiteContext
from .linear import dense_copy, is_quantized
from .protocol import COPY_SLOT, Controller, DeltaState, ModelDelta
from .targets import base_at, get_site, head_names, iter_sites, select, set_site

MODEL_NAMESPACE = "__model__"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class SiteRow:
    site: str
    adapter: str
    slot: str
    form: str
    params: int


@dataclass
class Summary:
    """Parameter accounting; ``str(summary)`` is a readable table."""

    total: int
    base: int
    trainable: int
    head_trainable: int
    rows: list[SiteRow] = field(default_factory=list)

    @property
    def trainable_without_head(self) -> int:
        return self.trainable - self.head_trainable

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        lines = [f"{'site':<60} {'adapter':<12} {'slot':<10} {'form':<10} {'params':>10}"]
        lines += [f"{r.site:<60} {r.adapter:<12} {r.slot:<10} {r.form:<10} {r.params:>10,}" for r in self.rows]
        lines.append(
            f"trainable {self.trainable:,} of base {self.base:,} ({self.trainable_percent:.4f}%); "
            f"without task head {self.trainable_without_head:,} "
            f"({100.0 * self.trainable_without_head / max(self.base, 1):.4f}%)"
        )
        return "\n".join(lines)


class TunedModel(nn.Module):
    """A model with peftkit adapters. Forward, `generate()` and unknown attributes go to the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, TunedModel):
            raise AdapterStateError("model is already a TunedModel; call .attach() on it instead.")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"peftkit needs a PyTorch model (a torch.nn.Module), got {type(model).__name__} "
                              f"{model!r:.60}; load one first, e.g. AutoModelForCausalLM.from_pretrained(path).")
        self.model = model
        self.model_deltas = nn.ModuleDict()
        object.__setattr__(self, "context", SiteContext())
        _expose_forward_signature(self)
        self._configs: dict[str, MethodConfig] = {}
        self._sites: dict[str, list[str]] = {}
        self._controllers: dict[str, Controller] = {}
        self._regularized: dict[str, list[DeltaState]] = {}  # adapter -> its deltas that define a regularizer
        self._undo: list[Callable[[], None]] | None = None  # what base preparations to revert, inside _all_or_nothing
        self.requantization_errors: dict[str, float] = {}  # site -> max |ΔW| of the last merge, quantized sites

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- adapters ----------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._configs)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self.context.active

    @property
    def adapter_weights(self) -> dict[str, float]:
        """The weights the active adapters were activated with (empty: all 1)."""
        return dict(self.context.weights)

    def config_of(self, name: str) -> MethodConfig:
        return self._configs[self._known(name)]

    def sites(self, name: str) -> list[str]:
        return list(self._sites[self._known(name)])

    def _known(self, name: str) -> str:
        if name not in self._configs:
            raise AdapterStateError(f"no adapter named {name!r}; this model has {self.adapters or 'none'}.")
        return name

    def attach(self, config: MethodConfig, name: str = "default", *, trainable: bool = True,
               activate: bool = True, state: dict[str, torch.Tensor] | None = None) -> TunedModel:
        """Add adapter `name` built from `config` (and filled with `state`, an adapter file's tensors,
        when given). Base weights are frozen; the new adapter's parameters train when `trainable`
        (the other adapters are frozen). On any error the model is left exactly as it was."""
        if not isinstance(config, MethodConfig):
            raise ConfigError(f"expected a config from peftkit.config(...), got {type(config).__name__}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"adapter name {name!r} may use only letters, digits, '_' and '-'.")
        if name in self._configs:
            raise AdapterStateError(f"an adapter named {name!r} already exists; pick another name or delete it.")
        with self._all_or_nothing():
            self._install(config, name)
            if state is not None:
                self.load_adapter_state(name, state)
            self.set_trainable(name if trainable else None)
            spec = registry.get(config.method)
            if spec.controller is not None:
                self._controllers[name] = spec.controller(config)
            if activate:
                self.activate(name)
        return self

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Undo on error what the block did: adapters it added are deleted, and the trainable flags
        and the active adapters are restored, and base preparations (a method's ``prepare``, e.g.
        qlora quantizing the base) are reverted: a failed load or attach leaves the model as it was."""
        flags = {id(p): p.requires_grad for p in self.parameters()}
        adapters, active, weights = self.adapters, self.context.active, dict(self.context.weights)
        outermost = self._undo is None
        if outermost:
            self._undo = []
        mark = len(self._undo)
        try:
            yield
        except BaseException:
            for name in [n for n in self.adapters if n not in adapters]:
                self.delete(name)
            while len(self._undo) > mark:
                self._undo.pop()()
            for p in self.parameters():
                if id(p) in flags:
                    p.requires_grad_(flags[id(p)])
            self.context.active, self.context.weights = active, weights
            raise
        finally:
            if outermost:
                self._undo = None

    def _install(self, config: MethodConfig, name: str) -> None:
        spec = registry.get(config.method)
        undo = spec.prepare(self.model, config) if spec.prepare is not None else None
        if undo is not None and self._undo is not None:
            self._undo.append(undo)
        attachment = spec.build(self.model, config)
        for site in self._trainable_module_sites(config, list(attachment.sites)):
            attachment.add(site, COPY_SLOT, TrainableCopy(base_at(self.model, site)))
        self._configs[name] = config
        self._sites[name] = list(attachment.sites)
        for site, slots in attachment.sites.items():
            host = self._host_at(site)
            for slot, delta in slots.items():
                host.add(name, slot, delta)
        if attachment.model_deltas:
            self.model_deltas[name] = nn.ModuleDict(attachment.model_deltas)
        deltas = [d for slots in (*attachment.sites.values(), attachment.model_deltas) for d in slots.values()]
        self._regularized[name] = [d for d in deltas if type(d).regularizer is not DeltaState.regularizer]

    def _trainable_module_sites(self, config: MethodConfig, adapted: list[str]) -> list[str]:
        """The modules `config.trainable_modules` names; none may hold another, or a site in `adapted`."""
        spec = config.trainable_modules
        if spec == "auto":
            return head_names(self.model)
        sites = select(self.model, spec) if spec else []
        for site in sites:
            inner = next((s for s in [*sites, *adapted] if s.startswith(site + ".") or site.startswith(s + ".")), None)
            if inner is not None:
                what = "also trained whole" if inner in sites else "where the adapter goes"
                raise TargetError(f"trainable_modules selects {site!r} and {inner!r} ({what}), one inside the other; "
                                  "a module is trained whole or adapted, once: name modules that do not contain each other.")
        return sites

    def _host_at(self, site: str) -> Host:
        module = get_site(self.model, site)
        if isinstance(module, Host):
            return module
        host = Host(module, self.context)
        set_site(self.model, site, host)
        return host

    def _hosts(self) -> Iterator[tuple[str, Host]]:
        for name, module in self.model.named_modules():
            if isinstance(module, Host):
                yield name, module

    def deltas(self, name: str) -> Iterator[tuple[str, DeltaState]]:
        """(state key prefix, delta) for every delta of adapter `name`."""
        self._known(name)
        for site, host in self._hosts():
            if name in host.deltas:
                for slot, delta in host.deltas[name].items():
                    yield f"{site}.{slot}", delta
        if name in self.model_deltas:
            for slot, delta in self.model_deltas[name].items():
                yield f"{MODEL_NAMESPACE}.{slot}", delta

    def set_trainable(self, name: str | None) -> None:
        """Freeze everything, then unfreeze the trainable tensors of adapter `name` (None: nothing)."""
        self.requires_grad_(False)
        if name is not None:
            for _, delta in self.deltas(name):
                for p in delta.trainable_parameters():
                    p.requires_grad_(True)

    def activate(self, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Make `names` the active adapters; `weights` scale each one's additive contribution."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            self._known(n)
        if weights is not None:
            if len(weights) != len(names):
                raise ConfigError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter.")
            for n in names:
                fixed = [key for key, d in self.deltas(n) if not getattr(d, "weightable", False)]
                if fixed:
                    raise ConfigError(f"adapter {n!r} has deltas that a weight cannot scale ({fixed[0]}, ...); "
                                      "weights apply only to additive (reparam / parallel) adapters.")
        self.context.active = names
        self.context.weights = dict(zip(names, weights, strict=True)) if weights is not None else {}

    def delete(self, name: str) -> None:
        """Remove adapter `name`; sites left without deltas get their original module back."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged into the base weights; call tuned.unmerge_adapter() "
                                    "before deleting it.")
        for site, host in list(self._hosts()):
            host.remove(name)
            if not host.deltas:
                set_site(self.model, site, host.base_layer)
        if name in self.model_deltas:
            self._release(name)
            del self.model_deltas[name]
        self._configs.pop(name, None)
        self._sites.pop(name, None)
        self._controllers.pop(name, None)
        self._regularized.pop(name, None)
        self.context.active = tuple(n for n in self.context.active if n != name)
        self.context.weights.pop(name, None)

    def detach(self) -> nn.Module:
        """Remove every adapter and return the original, unmodified model."""
        self.unmerge_adapter()
        for name in self.adapters:
            self.delete(name)
        return self.model

    # -- running -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[TunedModel]:
        """Run the bare base model inside the block (exactly: no delta is evaluated)."""
        if self.merged_adapters:
            raise AdapterStateError(f"adapters {self.merged_adapters} are merged into the base weights; "
                                    "call tuned.unmerge_adapter() before disabling them.")
        previous = self.context.disabled
        self.context.disabled = True
        try:
            yield self
        finally:
            self.context.disabled = previous

    @contextlib.contextmanager
    def _routing(self, adapter_names: Sequence[str | None] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        for n in adapter_names:
            if n is not None:
                self._known(n)
        if self.merged_adapters:
            raise AdapterStateError("mixed-adapter batches need unmerged adapters; call tuned.unmerge_adapter().")
        if any(n in self.model_deltas for n in adapter_names if n is not None):
            raise AdapterStateError("mixed-adapter batches are not supported for adapters with model-level "
                                    "(virtual token / prefix) parts.")
        self.context.route(list(adapter_names))
        try:
            yield
        finally:
            self.context.route(None)

    def _model_deltas(self) -> list[ModelDelta]:
        if self.context.disabled:
            return []
        return [d for n in self.context.active if n in self.model_deltas for d in self.model_deltas[n].values()]

    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The model's forward. `adapter_names` routes each sample to its own adapter (None = base).

        While training, the adapters' regularisation terms are added to ``outputs.loss``."""
        model_deltas = self._model_deltas()
        with self._routing(adapter_names), self._running(model_deltas):
            if not model_deltas:
                outputs = self.model(*args, **kwargs)
            else:
                kwargs = _positional_to_kwargs(args, kwargs)
                for delta in model_deltas:
                    kwargs = delta.prepare(self.model, kwargs)
                outputs = self.model(**kwargs)
                for delta in reversed(model_deltas):
                    outputs = delta.finish(outputs, kwargs)
        if self.training and getattr(outputs, "loss", None) is not None:
            extra = self.regularization_loss()
            if extra is not None:
                outputs.loss = outputs.loss + extra
        return outputs

    def regularization_loss(self) -> torch.Tensor | None:
        """Sum of the trainable deltas' regularisers (None when no delta has one)."""
        terms = [t for name in self.adapters for d in self._regularized.get(name, ())
                 if any(p.requires_grad for p in d.trainable_parameters()) and (t := d.regularizer()) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def update(self, step: int) -> None:
        """Training-time bookkeeping of methods that need it (e.g. rank reallocation). Call after each
        optimizer step, before gradients are zeroed; peftkit's trainer and HF callback do this."""
        for name, controller in self._controllers.items():
            if any(p.requires_grad for p in self.trainable_parameters(name)):
                controller.update(self, name, step)

    def controller(self, name: str) -> Controller | None:
        """The training-time controller of adapter `name` (None for methods without one)."""
        return self._controllers.get(self._known(name))

    @property
    def needs_calibration(self) -> list[str]:
        """Adapters that must see task data (`calibrate`) before they can train or be saved."""
        return [n for n, c in self._controllers.items() if c.needs_calibration(self, n)]

    def calibrate(self, batches: Iterable[dict[str, Any]], *, names: str | Sequence[str] | None = None,
                  loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None) -> list[str]:
        """Data-driven set-up of adapters before training (e.g. SNIP-scored masks): by default every
        adapter in `needs_calibration`. `batches` are dicts of model inputs with labels, so that
        ``model(**batch).loss`` exists, or any batches with a ``loss_fn(outputs, batch)``; a few are
        enough (they are materialised once). Call it after attaching, before creating the optimizer.
        Returns the names calibrated.

        Raises:
            AdapterStateError: an unknown adapter name, or no batches.
        """
        todo = self.needs_calibration if names is None else ([names] if isinstance(names, str) else list(names))
        for name in todo:
            self._known(name)
        batches = list(batches)
        if todo and not batches:
            raise AdapterStateError(f"calibrating {todo} needs at least one batch of task data.")
        for name in todo:
            controller = self._controllers.get(name)
            if controller is not None:
                with self._alone(name):
                    controller.calibrate(self, name, batches, loss_fn)
        return todo

    @contextlib.contextmanager
    def _alone(self, name: str) -> Iterator[None]:
        """Only adapter `name` active (weight 1), in eval mode (no dropout); restored afterwards."""
        ctx = self.context
        saved = (ctx.active, dict(ctx.weights), ctx.disabled, self.training)
        ctx.active, ctx.weights, ctx.disabled = (name,), {}, False
        self.eval()
        try:
            yield
        finally:
            ctx.active, ctx.weights, ctx.disabled = saved[0], saved[1], saved[2]
            self.train(saved[3])

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The model's `generate()` with the active adapters (or per-sample `adapter_names`)."""
        model_deltas = self._model_deltas()
        with self._routing(adapter_names), self._running(model_deltas):
            if not model_deltas:
                return self.model.generate(*args, **kwargs)
            kwargs = _positional_to_kwargs(args, kwargs)
            for delta in model_deltas:
                kwargs = delta.prepare_generate(self.model, kwargs)
            outputs = self.model.generate(**kwargs)
            for delta in reversed(model_deltas):
                outputs = delta.finish_generate(outputs, kwargs)
            return outputs

    @contextlib.contextmanager
    def _running(self, model_deltas: list[ModelDelta]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for delta in model_deltas:
                stack.enter_context(delta.running(self.model))
            yield

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Enable the model's gradient checkpointing; non-reentrant by default so frozen inputs are fine."""
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        earlier = list(getattr(self.model, "_require_grads_hooks", None) or [])  # a caller's own, kept
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if options["use_reentrant"]:
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()
        elif hasattr(self.model, "disable_input_require_grads"):
            # transformers also makes the embeddings' output require grad, which only reentrant checkpointing
            # needs: with it, a model whose trainable parameters all sit near the top (a head, the last layers)
            # would run backward through every frozen layer below them.
            self.model.disable_input_require_grads()
            if earlier:
                self.model._require_grads_hooks, self.model._require_grads_hook = earlier, earlier[0]

    # -- merging -----------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for _, h in self._hosts() for n in h.merged_adapters))

    def merge_adapter(self, names: str | Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, reversibly. Quantized base
        layers are re-quantized, with a `QuantizedMergeWarning` (see `merge`); unmerging is exact.
        On any error nothing is merged."""
        self._merge(self._mergeable(names))

    def _mergeable(self, names: str | Sequence[str] | None) -> tuple[str, ...]:
        """`names` (default: the active adapters), checked to fold into weights; changes nothing."""
        names = self.context.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
        for n in names:
            self._known(n)
            if n in self.model_deltas:
                slots = ", ".join(self.model_deltas[n].keys())
                raise NotMergeableError(f"adapter {n!r} has model-level parts ({slots}) that live outside the weights; "
                                        "it cannot be merged. Keep using the TunedModel, or save the adapter.")
            if self.context.weights.get(n, 1.0) != 1.0:
                raise NotMergeableError(f"adapter {n!r} is active with weight {self.context.weights[n]}; "
                                        "merging weighted activations is not supported.")
        for _, host in self._hosts():
            host.check_mergeable(names)
        return names

    def _merge(self, names: tuple[str, ...], dequantize: bool = False) -> bool:
        """Fold checked `names` into every site they have; all or nothing. Returns whether a tied
        weight (input embeddings shared with the LM head) got a private merged copy."""
        hosts = [(site, h) for site, h in self._hosts() if any(n in h.deltas for n in names)]
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        undo: list[Callable[[], None]] = []
        swapped = self._dequantize_base() if dequantize else []
        untied = False
        try:
            for _, host in hosts:
                tied = [k for k, p in host.base_layer.named_parameters() if uses[id(p)] > 1]
                untied = untied or bool(tied)
                undo.append(host.merge(names, untie=tied))
        except BaseException:
            for restore in reversed(undo):
                restore()
            for site, original in reversed(swapped):
                self._put_base(site, original)
            raise
        self.requantization_errors = {site: h.requantization_error for site, h in hosts
                                      if h.requantization_error is not None}
        if any(self.requantization_errors.values()):
            _warn_requantized(names, self.requantization_errors)
        return untied

    def _put_base(self, site: str, module: nn.Module) -> None:
        current = get_site(self.model, site)
        if isinstance(current, Host):
            current.base_layer = module
        else:
            set_site(self.model, site, module)

    def _dequantize_base(self) -> list[tuple[str, nn.Module]]:
        """Replace every quantized layer of the model by its full-precision equivalent; returns the
        (site, quantized layer) pairs replaced."""
        swapped = [(site, module) for site, module in iter_sites(self.model) if is_quantized(module)]
        for site, module in swapped:
            self._put_base(site, dense_copy(module))
        return swapped

    def unmerge_adapter(self) -> None:
        """Restore the exact base weights saved at merge time."""
        for _, host in self._hosts():
            host.unmerge()

    def merge(self, names: str | Sequence[str] | None = None, *, dequantize: bool = False) -> nn.Module:
        """Fold adapters (default: the active ones) into the base weights and return the plain model,
        with no peftkit module left in it. This TunedModel is emptied. Adapters not folded would be
        lost, so with ``names=None`` an attached but inactive adapter is an error: name what to fold.
        On any error the TunedModel is left as it was.

        On a quantized base (``peftkit.quantize``): by default each adapted layer is dequantized,
        the adapters folded in and the result re-quantized, so the model stays small, but its
        outputs move away from the unmerged adapter's by the re-quantization error. That error is
        never silent: a `QuantizedMergeWarning` gives the largest weight change, and
        ``tuned.requantization_errors`` holds it per layer. With ``dequantize=True`` every quantized
        layer is first replaced by its full-precision equivalent and the merge is exact: the result
        is a full-precision model (larger) whose outputs match the unmerged adapter's.
        """
        chosen = self._mergeable(names)
        left = [n for n in self.adapters if n not in chosen]
        if names is None and left:
            raise AdapterStateError(
                f"merge() folds the active adapters {list(chosen)} and returns a plain model, so {left} "
                f"(attached, not active) would be lost. Name what to fold: tuned.merge({[*chosen, *left]!r}) for "
                f"all, tuned.merge({list(chosen)!r}) to drop the rest, or tuned.delete(...) first.")
        previously = self.merged_adapters
        self.unmerge_adapter()
        try:
            untied = self._merge(chosen, dequantize=dequantize)
        except BaseException:
            if previously:
                self._merge(previously)
            raise
        if untied:
            _untie_config(self.model)
        for site, host in list(self._hosts()):
            set_site(self.model, site, host.base_layer)
        for name in list(self.model_deltas):
            self._release(name)
        self.model_deltas.clear()
        self._configs.clear()
        self._sites.clear()
        self._controllers.clear()
        self.context.active, self.context.weights = (), {}
        model = self.model
        model.requires_grad_(False)
        return model

    # -- state -------------------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors keyed ``<site>.<slot>.<tensor>`` (what an adapter file holds)."""
        state = {}
        for prefix, delta in self.deltas(name):
            state.update({f"{prefix}.{k}": v for k, v in delta.export_state().items()})
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors into adapter `name`, checking names and shapes first (nothing changes on error)."""
        expected = {}
        for prefix, delta in self.deltas(name):
            own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            expected.update({f"{prefix}.{k}": s for k, s in delta.state_shapes(own).items()})
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
        dtypes = {}
        for prefix, delta in self.deltas(name):
            with contextlib.suppress(AdapterStateError):  # masks not scored yet: the file brings them
                dtypes.update({f"{prefix}.{k}": v.dtype for k, v in delta.export_state().items()})
        odd = sorted(k for k in set(dtypes) & set(state) if not fits_dtype(state[k].dtype, dtypes[k]))
        if missing or extra or wrong or odd:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {expected[k]}")
            if odd:
                k = odd[0]
                parts.append(f"{len(odd)} dtype mismatch(es), e.g. {k}: file {state[k].dtype} vs model {dtypes[k]}")
            raise AdapterFileError("adapter tensors do not fit this model: " + "; ".join(parts)
                                   + ". Was it saved for a different model or config?")
        for prefix, delta in self.deltas(name):
            own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            delta.import_state(own)

    def trainable_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        if name is None:
            return [p for p in self.parameters() if p.requires_grad]
        return [p for _, d in self.deltas(name) for p in d.trainable_parameters()]

    def summary(self) -> Summary:
        rows, delta_ids = [], set()
        head = 0
        for name in self.adapters:
            for prefix, delta in self.deltas(name):
                site, _, slot = prefix.rpartition(".")
                n = sum(p.numel() for p in delta.trainable_parameters())
                delta_ids.update(id(p) for p in delta.parameters())
                rows.append(SiteRow(site, name, slot, delta.form, n))
                if slot.startswith(COPY_SLOT):
                    head += sum(p.numel() for p in delta.trainable_parameters() if p.requires_grad)
        quantized = sum(m.in_features * m.out_features for m in self.modules() if is_quantized(m))  # buffers, not params
        total = sum(p.numel() for p in self.parameters()) + quantized
        base = sum(p.numel() for p in self.parameters() if id(p) not in delta_ids) + quantized
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return Summary(total=total, base=base, trainable=trainable, head_trainable=head, rows=rows)

    def save(self, path: str, *, format: str = "peftkit", adapter: str | None = None) -> str:
        """Write adapter(s) to folder `path` atomically; ``format="hf-peft"`` for the PEFT layout."""
        return files.save(self, path, format=format, adapter=adapter)

    def _release(self, name: str) -> None:
        for delta in self.model_deltas[name].values():
            delta.release(self.model)


def _untie_config(model: nn.Module) -> None:
    """A merged delta on a tied weight (e.g. input embeddings shared with the LM head) changes only
    its own copy, so the merged model must stop re-tying them when saved and reloaded."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        warnings.warn("merging into a tied weight: the merged model keeps separate input and output "
                      "embeddings (config.tie_word_embeddings set to False).", stacklevel=3)


def _warn_requantized(names: Sequence[str], errors: dict[str, float]) -> None:
    site, worst = max(errors.items(), key=lambda item: item[1])
    changed = sum(1 for e in errors.values() if e)
    warnings.warn(QuantizedMergeWarning(
        f"merging {', '.join(names)} into {changed} quantized layer(s) re-quantized them: the largest weight "
        f"change re-quantization added is {worst:.3g} (at {site}), so outputs differ from the unmerged adapter's "
        "by quantization error (per layer: tuned.requantization_errors). Merge with dequantize=True for an exact, "
        "full-precision result, or keep the adapter unmerged."), stacklevel=4)


def _positional_to_kwargs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return dict(kwargs)
    if len(args) > 1:
        raise ConfigError("pass model inputs by keyword (input_ids=..., attention_mask=...) when an adapter "
                          "adds virtual tokens or prefixes.")
    return {"input_ids": args[0], **kwargs}


def attach(model: nn.Module, config: MethodConfig | str | dict[str, Any], name: str = "default", *,
           trainable: bool = True) -> TunedModel:
    """Attach an adapter built from `config` (a config, a method name, or its dict form) to `model` (a
    plain model or a TunedModel)."""
    if not isinstance(config, MethodConfig):
        config = registry.config(config)
    tuned = model if isinstance(model, TunedModel) else TunedModel(model)
    return tuned.attach(config, name, trainable=trainable)


def _expose_forward_signature(tuned: TunedModel) -> None:
    """Give this instance's ``forward`` the wrapped model's signature (plus ``adapter_names``).

    Tools read a model's accepted inputs from ``inspect.signature(model.forward)`` (e.g.
    ``transformers.Trainer`` drops dataset columns that are not forward parameters); the class's
    generic ``forward(*args, **kwargs)`` would make them drop everything.
    """
    import functools
    import inspect

    try:
        inner = inspect.signature(tuned.model.forward)
    except (TypeError, ValueError):
        return
    kinds = inspect.Parameter
    params = [p for p in inner.parameters.values() if p.name != "adapter_names"]
    head = [p for p in params if p.kind < kinds.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind == kinds.KEYWORD_ONLY]
    rest = [p for p in params if p.kind == kinds.VAR_KEYWORD]
    routed = kinds("adapter_names", kinds.KEYWORD_ONLY, default=None)
    forward = functools.partial(TunedModel.forward, tuned)
    forward.__signature__ = inner.replace(parameters=[*head, *keyword, routed, *rest])  # type: ignore[attr-defined]
    tuned.__dict__["forward"] = forward
