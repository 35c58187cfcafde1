"""``peftkit generate``: text from a causal LM, with an adapter or bare."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from .common import (
    POSITIVE_INT,
    adapter_folder,
    adapter_task,
    add_adapter_args,
    base_model_name,
    emit,
    load_tuned,
    number,
    subcommand,
)


def add_parser(subs: Any) -> None:
    p = subcommand(subs, "generate", "generate text with a causal LM and an adapter",
                   "peftkit generate --model smollm2 --adapter runs/smollm2-chatterbot-lora/adapter --prompt 'Hello'")
    add_adapter_args(p, required=False)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read lines from piped stdin")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="tokens to generate per prompt [64]")
    p.add_argument("--temperature", type=number(float, 0.0), default=0.0,
                   help="sampling temperature, >= 0; 0: greedy [0]")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=True,
                   help="send the prompt as it is, not through the model's chat template")
    p.set_defaults(run=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    if getattr(args, "prompt", None):
        return list(args.prompt)
    if sys.stdin is None or sys.stdin.isatty():  # nobody is piping prompts: do not wait for them
        raise ConfigError("no prompt: pass --prompt 'text' (repeatable), or pipe prompts on stdin, one per line.")
    lines = [line.strip() for line in sys.stdin.read().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError("no prompt: pass --prompt 'text' (repeatable) or pipe prompts on stdin, one per line.")
    return prompts


def _check_causal(args: argparse.Namespace) -> None:
    """Refuse an adapter trained for classification before any model is loaded."""
    from ..train.run import load_run

    folder = adapter_folder(args.adapter)
    task, model = adapter_task(folder, load_run(folder))
    if task == "classification":
        raise ConfigError(f"generate needs a causal-LM adapter (task instruction or lm); {folder} is a "
                          f"classification adapter of {model}. Evaluate it with `peftkit eval --adapter {folder}`.")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train import models
    from ..train.data import format_prompt

    if getattr(args, "adapter", None):
        _check_causal(args)
    elif not getattr(args, "model", None):
        raise ConfigError("generate needs a model: pass --model (a causal LM, e.g. smollm2) or --adapter.")
    prompts = _prompts(args)
    if getattr(args, "adapter", None):
        tok, tuned, _ = load_tuned(args, "lm")
    else:
        path = models.resolve(base_model_name(args, None))
        if not models.is_causal(path):
            raise ConfigError(f"generate needs a causal language model; {args.model} is an encoder. Pass a causal "
                              "LM, e.g. --model smollm2.")
        tok = models.tokenizer(path)
        tuned = models.load(path, "lm").eval()
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
    emit(args, {"generations": outputs, "adapter_path": getattr(args, "adapter", None)}, text)
    return 0
