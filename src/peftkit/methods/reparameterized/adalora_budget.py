"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule and global masking.

Driven by ``tuned.update(step)`` after every ``optimizer.step()`` and before ``zero_grad()``, with
`step` the 0-based index of the optimizer step just taken (peftkit's trainer and its HF callback
do this; in a plain loop ``for step in range(total_steps): ...; optimizer.step();
tuned.update(step); optimizer.zero_grad()``). The schedule below counts steps taken, ``n = step + 1``.

Per step, until the final phase: sensitivity ``I = |θ ⊙ ∇θ|`` of every entry of P, Λ, Q, smoothed
``Ī ← β₁Ī + (1−β₁)I`` and its uncertainty ``Ū ← β₂Ū + (1−β₂)|I − Ī|``; score ``s = Ī·Ū``. A
triplet's score is ``s(λᵢ) + mean s(Q_i,:) + mean s(P_:,i)``. Every `delta_t` steps between
`t_init` and ``total_steps − t_final`` the `budget_at(n)` best triplets across all sites are
kept and the rest masked; at ``total_steps − t_final`` the target budget is fixed for good and the
masked triplets are pruned. Masking zeroes the singular value (the vectors stay, so a triplet can
come back while the budget still moves) and is re-applied after every update, so right after
``tuned.update(step)`` the model equals its saved form.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.protocol import Controller
from ...errors import ConfigError


def budget_at(n: int, initial: int, target: int, t_init: int, t_final: int, total_steps: int) -> int:
    """Total number of singular values kept after `n` optimizer steps: `initial` while n ≤ t_init,
    then the cubic decay ``target + (initial − target)·(1 − (n − t_init)/(total − t_final − t_init))³``
    (rounded down), and `target` from ``n = total_steps − t_final`` on."""
    if n <= t_init:
        return initial
    if n >= total_steps - t_final:
        return target
    progress = 1.0 - (n - t_init) / (total_steps - t_final - t_init)
    return int(target + (initial - target) * progress**3)


class RankAllocator(Controller):
    """The per-adapter controller: keeps the importance statistics and sets the masks.

    ``history`` records ``(n, budget, kept)`` for every masking (n = optimizer steps taken).
    """

    def __init__(self, config: Any, delta_type: type) -> None:
        self.config = config
        self.delta_type = delta_type
        self.final = False
        self.history: list[tuple[int, int, int]] = []
        self._ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity Ī per tensor
        self._unc: dict[str, torch.Tensor] = {}  # uncertainty Ū per tensor

    def update(self, tuned: Any, name: str, step: int) -> None:
        deltas = [(prefix, d) for prefix, d in tuned.deltas(name) if isinstance(d, self.delta_type)]
        if not deltas:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"tuned.update(step) takes the 0-based index of the optimizer step just taken "
                              f"(an int >= 0), got {step!r}.")
        c, n = self.config, step + 1
        end = c.total_steps - c.t_final
        if n < end:
            self._accumulate(deltas)
        if n >= end and not self.final:
            self._mask(deltas, n, self.target(len(deltas)))
            for _, d in deltas:
                d.prune()
            self.final = True
            self._ipt.clear()
            self._unc.clear()
        elif not self.final and n > c.t_init and n % c.delta_t == 0:
            initial = sum(d.r for _, d in deltas)
            self._mask(deltas, n, budget_at(n, initial, self.target(len(deltas)), c.t_init, c.t_final, c.total_steps))
        for _, d in deltas:
            d.apply_mask()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for an exact resume (peftkit's trainer checkpoints them)."""
        state = {"final": torch.tensor(self.final), "history": torch.tensor(self.history, dtype=torch.int64).reshape(-1, 3)}
        state.update({f"ipt.{k}": v for k, v in self._ipt.items()})
        state.update({f"unc.{k}": v for k, v in self._unc.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.final = bool(state["final"])
        self.history = [tuple(int(x) for x in row) for row in state["history"].tolist()]
        self._ipt = {k[4:]: v for k, v in state.items() if k.startswith("ipt.")}
        self._unc = {k[4:]: v for k, v in state.items() if k.startswith("unc.")}

    def target(self, n_sites: int) -> int:
        return self.config.target_budget(n_sites)

    @torch.no_grad()
    def _accumulate(self, deltas: list[tuple[str, Any]]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for prefix, delta in deltas:
            for tname, p in (("A", delta.A), ("E", delta.E), ("B", delta.B)):
                if p.grad is None:
                    continue
                key = f"{prefix}.{tname}"
                sensitivity = (p * p.grad).abs().float()
                ipt = self._ipt.get(key, torch.zeros_like(sensitivity))
                ipt = b1 * ipt + (1 - b1) * sensitivity
                unc = self._unc.get(key, torch.zeros_like(sensitivity))
                self._unc[key] = b2 * unc + (1 - b2) * (sensitivity - ipt).abs()
                self._ipt[key] = ipt

    def _score(self, prefix: str, delta: Any, tname: str) -> torch.Tensor:
        key = f"{prefix}.{tname}"
        if key not in self._ipt:
            return torch.zeros(delta.r, device=delta.E.device)
        s = self._ipt[key] * self._unc[key]
        if tname == "A":  # (r, in): Q's rows
            return s.mean(dim=1)
        if tname == "B":  # (out, r): P's columns
            return s.mean(dim=0)
        return s  # (r,)

    @torch.no_grad()
    def _mask(self, deltas: list[tuple[str, Any]], n: int, budget: int) -> None:
        scores = [sum(self._score(prefix, d, t) for t in ("A", "E", "B")) for prefix, d in deltas]
        flat = torch.cat([s.to(scores[0].device) for s in scores])  # (Σr,)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, budget, sorted=False).indices] = True  # exactly `budget` survive
        start = 0
        for (_, d), s in zip(deltas, scores, strict=True):
            d.set_mask(keep[start:start + s.numel()])
            start += s.numel()
        self.history.append((n, budget, int(keep.sum())))
