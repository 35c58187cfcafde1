"""``peftkit eval | generate | merge | info | methods`` (``train`` lives in `peftkit.cli`).

Where an adapter came from a ``peftkit train`` run, its ``run.json`` supplies the defaults
(base model, task, data, fields, label count), so ``peftkit eval --adapter runs/x/adapter`` is
enough. Every command prints one JSON object as its last stdout line with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, ConfigError
from . import models
from .run import load_run


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(text, flush=True)
    if getattr(args, "json", False):
        print(json.dumps(doc, default=str), flush=True)


def _adapter_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist.")
    return folder


def _base_model_name(args: argparse.Namespace, run: dict[str, Any] | None) -> str:
    name = getattr(args, "model", None) or (run or {}).get("config", {}).get("model")
    if not name:
        raise ConfigError("which base model? pass --model (the adapter has no run.json next to it to say).")
    return name


def _load_tuned(args: argparse.Namespace, task: str, num_labels: int | None = None) -> tuple[Any, Any, dict | None]:
    import peftkit

    folder = _adapter_folder(args.adapter)
    run = load_run(folder)
    path = models.resolve(_base_model_name(args, run))
    tok = models.tokenizer(path)
    labels = num_labels or (run or {}).get("num_labels")
    model = models.load(path, task, labels, tok.pad_token_id)
    quant = (run or {}).get("config", {}).get("quantize")
    if quant:
        from .run import quantize_base

        model = quantize_base(model, quant)
    tuned = peftkit.load(model, folder)
    tuned.eval()
    return tok, tuned, run


# -- eval -------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from . import data as data_mod
    from .config import TrainConfig
    from .run import plan
    from .trainer import evaluate

    run = load_run(_adapter_folder(args.adapter))
    saved = dict((run or {}).get("config", {}))
    keys = ("data", "eval_data", "task", "text_field", "label_field", "prompt_field", "response_field",
            "max_length", "eval_batch_size")
    saved.update({k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})
    if getattr(args, "model", None):
        saved["model"] = args.model
    if "data" in vars(args) and "eval_data" not in vars(args):
        saved["eval_data"] = None  # new data: use its own held-out split
    base = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    base.update(resume=None, out=None, quantize=None)
    job = plan(TrainConfig(**base))
    tok, tuned, _ = _load_tuned(args, job.task, (run or {}).get("num_labels"))
    prepared = data_mod.prepare(job.cfg, tok, job.task, job.source, job.eval_source)
    if prepared.num_labels is not None and run and run.get("num_labels"):
        prepared.num_labels = max(prepared.num_labels, run["num_labels"])
    metrics = evaluate(tuned, prepared.eval, job.task, num_labels=prepared.num_labels, pad_id=tok.pad_token_id,
                       batch_size=job.cfg.eval_batch_size)
    text = f"{args.adapter} on {job.cfg.data} ({prepared.meta['eval_examples']} held-out): " + ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
    _emit(args, {"metrics": metrics, "adapter_path": args.adapter, "data": prepared.meta}, text)
    return 0


# -- generate ---------------------------------------------------------------------------------------
def _prompts(args: argparse.Namespace) -> list[str]:
    if getattr(args, "prompt", None):
        return list(args.prompt)
    lines = [line.strip() for line in sys.stdin.read().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError("no prompt: pass --prompt 'text' (repeatable) or pipe prompts on stdin, one per line.")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import format_prompt

    if getattr(args, "adapter", None):
        tok, tuned, _ = _load_tuned(args, "lm")
    else:
        path = models.resolve(_base_model_name(args, None))
        tok = models.tokenizer(path)
        tuned = models.load(path, "lm").eval()
    prompts = _prompts(args)
    outputs = []
    for prompt in prompts:
        text = format_prompt(tok, prompt) if args.chat_template else prompt
        chat = args.chat_template and bool(getattr(tok, "chat_template", None))
        enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
        sample = args.temperature > 0
        with torch.inference_mode():
            ids = tuned.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                                 temperature=args.temperature if sample else None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        reply = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        outputs.append({"prompt": prompt, "response": reply})
    text = "\n".join(f">>> {o['prompt']}\n{o['response']}" for o in outputs)
    _emit(args, {"generations": outputs, "adapter_path": getattr(args, "adapter", None)}, text)
    return 0


# -- merge ------------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> int:
    from ..core.atomic import atomic_folder

    run = load_run(_adapter_folder(args.adapter))
    task = (run or {}).get("data", {}).get("task") or ("lm" if models.is_causal(
        models.resolve(_base_model_name(args, run))) else "classification")
    tok, tuned, _ = _load_tuned(args, task)
    target = Path(args.out)
    if target.exists() and any(target.iterdir()):
        raise AdapterFileError(f"{target} exists and is not empty; choose a new folder for the merged model.")
    merged = tuned.merge()
    with atomic_folder(target) as tmp:
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    size = models.folder_bytes(target)
    _emit(args, {"merged_path": str(target), "bytes": size, "adapter_path": args.adapter},
          f"merged {args.adapter} into {target} ({size / 2**20:.1f} MiB); load it with "
          f"transformers.AutoModel*.from_pretrained('{target}')")
    return 0


# -- info -------------------------------------------------------------------------------------------
def _tensor_counts(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    params, tensors = 0, 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            params += n
            tensors += 1
    return params, tensors


def _describe(folder: Path) -> dict[str, Any]:
    from ..core.files import INDEX
    from ..core.files.hf_format import HF_CONFIG
    from ..core.files.peftkit_format import META, WEIGHTS

    if (folder / META).is_file():
        meta = json.loads((folder / META).read_text())
        params, tensors = _tensor_counts(folder / WEIGHTS)
        base = meta.get("base", {})
        sites = sorted(base.get("shapes", {}))
        return {"format": "peftkit", "name": meta.get("name"), "method": meta.get("method"),
                "config": meta.get("config"), "sites": sites, "parameters": params, "tensors": tensors,
                "bytes": models.folder_bytes(folder),
                "base": {k: base.get(k) for k in ("architecture", "model_type", "name_or_path", "weights_sha256")}}
    if (folder / HF_CONFIG).is_file():
        conf = json.loads((folder / HF_CONFIG).read_text())
        weights = folder / "adapter_model.safetensors"
        params, tensors = _tensor_counts(weights) if weights.is_file() else (0, 0)
        return {"format": "hf-peft", "method": conf.get("peft_type"), "config": conf,
                "sites": conf.get("target_modules"), "parameters": params, "tensors": tensors,
                "bytes": models.folder_bytes(folder), "base": {"name_or_path": conf.get("base_model_name_or_path")}}
    if (folder / INDEX).is_file():
        names = json.loads((folder / INDEX).read_text()).get("adapters", [])
        return {"format": "multi", "adapters": {n: _describe(folder / n) for n in names},
                "bytes": models.folder_bytes(folder)}
    raise AdapterFileError(f"{folder} holds no adapter (no {META}, {HF_CONFIG} or {INDEX}).")


def _info_text(path: str, info: dict[str, Any]) -> str:
    if info["format"] == "multi":
        return "\n\n".join(_info_text(f"{path}/{n}", sub) for n, sub in info["adapters"].items())
    base = info.get("base", {})
    sites = info.get("sites") or []
    shown = ", ".join(sites[:4]) + (f", ... ({len(sites)} sites)" if len(sites) > 4 else "")
    options = {k: v for k, v in (info.get("config") or {}).items() if k != "method" and v not in (None, {}, [])}
    return "\n".join([
        f"{path}: {info['method']} adapter ({info['format']} format)",
        f"  options: {json.dumps(options, default=str)}",
        f"  sites: {shown}",
        f"  parameters: {info['parameters']:,} in {info['tensors']} tensors; {info['bytes'] / 1024:.1f} KiB on disk",
        "  base: " + ", ".join(f"{k}={v}" for k, v in base.items() if v),
    ])


def cmd_info(args: argparse.Namespace) -> int:
    folder = _adapter_folder(args.path)
    try:
        info = _describe(folder)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise AdapterFileError(f"{folder} is damaged: {err}") from None
    _emit(args, {"path": str(folder), **info}, _info_text(str(folder), info))
    return 0


# -- methods ----------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from ..core import registry
    from .recipes import recipe

    rows = []
    for s in registry.specs():
        rec = recipe(s.name)
        rows.append({"name": s.name, "family": s.family, "summary": s.summary, "hf_peft": s.hf is not None,
                     "recommended_lr": rec.lr, "recommended_head_lr": rec.head_lr,
                     "recommended_base_dropout": rec.base_dropout, "probe_head": rec.probe_head,
                     "train_options": dict(rec.options), "options": list(s.config_cls.option_names())})
    width = max((len(r["name"]) for r in rows), default=4)
    lines = [f"{r['name']:<{width}}  {r['family']:<16} {r['summary']}"
             + (f" Default lr {r['recommended_lr']:g}." if r["recommended_lr"] else "")
             + (f" Task head lr {r['recommended_head_lr']:g}." if r["recommended_head_lr"] else "")
             + (f" Base dropout {r['recommended_base_dropout']:g}." if r["recommended_base_dropout"] is not None else "")
             + (" Fits a new task head first." if r["probe_head"] else "")
             + "".join(f" Trains with {k}={v}." for k, v in r["train_options"].items()) for r in rows]
    _emit(args, {"methods": rows}, "\n".join(lines))
    return 0
