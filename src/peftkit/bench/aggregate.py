"""The aggregate over seeds: one row per entry (mean ± sample std over its seeds), as a Markdown
table and a CSV.

Relative columns answer the survey's claims against ``full`` (when it ran): quality (the entry's
metric minus full's), file size against the whole model's (its parameters in fp32), peak memory
against full's, and forgetting against full's. Task gain is the improvement over the untrained
model (accuracy up, or loss down).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..core.atomic import write_text

LOWER_IS_BETTER = {"loss", "perplexity"}
CSV_FIELDS = ("label", "method", "family", "seeds", "metric", "value_mean", "value_std", "gain_mean", "vs_full",
              "trainable", "trainable_without_head", "percent", "adapter_bytes", "file_vs_model", "peak_rss_bytes",
              "rss_vs_full", "saved_for_backward_bytes", "step_seconds", "wall_seconds", "forgetting_mean",
              "forgetting_std", "forgetting_vs_full", "forgetting_measure")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def rows(records: list[dict[str, Any]], base: dict[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """One row per entry label in `order` that has records."""
    metric = base["metric"]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for label in order:
        group = by_label.get(label)
        if not group:
            continue
        first = group[0]
        values = [r["value"] for r in group]
        lost = [r["forgetting"]["lost"] for r in group]
        mean = _mean(values)
        out.append({
            "label": label, "method": first["method"], "family": first["family"], "seeds": len(group),
            "metric": metric, "value_mean": mean, "value_std": _std(values),
            "gain_mean": None if mean is None or base.get("value") is None else sign * (mean - base["value"]),
            "trainable": first["params"]["trainable"], "trainable_without_head": first["params"]["trainable_without_head"],
            "percent": first["params"]["percent"], "adapter_bytes": _mean([r["adapter_bytes"] for r in group]),
            "peak_rss_bytes": _mean([r["memory"]["peak_rss_bytes"] for r in group]),
            "saved_for_backward_bytes": _mean([r["memory"]["saved_for_backward_bytes"] for r in group]),
            "step_seconds": _mean([r["time"]["step_seconds"] for r in group]),
            "wall_seconds": _mean([r["time"]["wall_seconds"] for r in group]),
            "forgetting_mean": _mean(lost), "forgetting_std": _std(lost),
            "forgetting_measure": first["forgetting"]["measure"],
        })
    full = next((r for r in out if r["method"] == "full"), None)
    model_bytes = 4 * base["params"]
    for r in out:
        r["file_vs_model"] = _ratio(r["adapter_bytes"], model_bytes)
        r["vs_full"] = None if full is None or r["value_mean"] is None or full["value_mean"] is None else \
            r["value_mean"] - full["value_mean"]
        r["rss_vs_full"] = _ratio(r["peak_rss_bytes"], full["peak_rss_bytes"]) if full else None
        # a ratio only against a clear loss: full's forgetting near zero or negative would make it meaningless
        forgot = full is not None and full["forgetting_mean"] is not None and full["forgetting_mean"] > 0
        r["forgetting_vs_full"] = _ratio(r["forgetting_mean"], full["forgetting_mean"]) if forgot else None
    return out


def _num(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def _pm(mean: float | None, std: float | None, spec: str = ".4f") -> str:
    if mean is None:
        return "—"
    return format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")


def _count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v + 0.0:.3g}×"  # + 0.0: no "-0×"


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g} s"


def markdown(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    """The aggregate as a Markdown table (with a line on the untrained model and the forgetting measure)."""
    metric = base["metric"]
    head = (f"| method | family | seeds | {metric} | {metric} − full's | trainable params (without head) | % of model "
            "| file | file ÷ model | peak RSS | RSS ÷ full | saved for backward | step time | wall time "
            "| forgetting | forgetting ÷ full |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['family']} | {r['seeds']} | {_pm(r['value_mean'], r['value_std'])} "
            f"| {_num(r['vs_full'], '+.4f')} | {_count(r['trainable'])} ({_count(r['trainable_without_head'])}) "
            f"| {_num(r['percent'], '.3g')} | {_bytes(r['adapter_bytes'])} | {_x(r['file_vs_model'])} "
            f"| {_bytes(r['peak_rss_bytes'])} | {_x(r['rss_vs_full'])} | {_bytes(r['saved_for_backward_bytes'])} "
            f"| {_secs(r['step_seconds'])} | {_secs(r['wall_seconds'])} "
            f"| {_pm(r['forgetting_mean'], r['forgetting_std'])} | {_x(r['forgetting_vs_full'])} |")
    f = base["forgetting"]
    lines += ["", f"Untrained model: {metric} {_num(base.get('value'))} on the held-out sample "
                  f"({base['data'].get('eval_examples')} examples). Forgetting: {f['describe']}; the base model scores "
                  f"{f['base']:.4f}."]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def write(out: Path, rows: list[dict[str, Any]], base: dict[str, Any], plan: Any,
          env: dict[str, Any] | None = None) -> dict[str, str]:
    """results.md (the table, the settings, the environment) and results.csv; returns their paths."""
    settings = plan.settings
    header = [f"# peftkit bench: {settings.model} on {settings.data} ({plan.task})", "",
              f"Preset {plan.preset}; {plan.seeds} seed(s); {settings.max_steps} steps per training run; held-out "
              f"sample {settings.max_eval_examples or 'all'}; mean ± std over seeds.", ""]
    if env:
        header[-1:] = [f"Machine: {env.get('processor') or env.get('machine')}, {env.get('cpus')} CPUs, "
                       f"{env.get('threads')} torch threads, {env.get('device', 'cpu')}, precision "
                       f"{env.get('precision', settings.precision)}; peftkit {env.get('peftkit')}, torch "
                       f"{env.get('torch')}, transformers {env.get('transformers')}, Python {env.get('python')}.", ""]
    write_text(out / "results.md", "\n".join(header) + markdown(rows, base) + "\n")
    write_text(out / "results.csv", to_csv(rows))
    return {"table": str(out / "results.md"), "csv": str(out / "results.csv")}
