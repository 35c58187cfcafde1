"""``peftkit merge``: an adapter folded into its base, written as a plain Hugging Face model folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError
from .common import adapter_folder, add_adapter_args, base_model_name, emit, load_tuned, subcommand


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "merge", "fold an adapter into its base and write a Hugging Face model folder",
                   "peftkit merge --adapter runs/minilm-rotten-tomatoes-lora/adapter --out merged/")
    add_adapter_args(p)
    p.add_argument("--out", required=True, help="folder for the merged model (created; must not hold other files)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.atomic import atomic_folder
    from ..train import models
    from ..train.output import check_writable
    from ..train.run import load_run

    saved_run = load_run(adapter_folder(args.adapter))
    target = Path(args.out)
    check_writable(target, "--out")
    if target.is_dir() and any(target.iterdir()):
        raise AdapterFileError(f"{target} exists and is not empty; choose a new folder for the merged model.")
    task = (saved_run or {}).get("data", {}).get("task") or ("lm" if models.is_causal(
        models.resolve(base_model_name(args, saved_run))) else "classification")
    tok, tuned, _ = load_tuned(args, task)
    merged = tuned.merge()
    with atomic_folder(target) as tmp:
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    size = models.folder_bytes(target)
    emit(args, {"merged_path": str(target), "bytes": size, "adapter_path": args.adapter},
         f"merged {args.adapter} into {target} ({size / 2**20:.1f} MiB); load it with "
         f"transformers.AutoModel*.from_pretrained('{target}')")
    return 0
