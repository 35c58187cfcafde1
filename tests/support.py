"""Helpers for the trainer / data / CLI tests: tiny model folders with a word-level tokenizer, and
small synthetic data files. Their session fixtures are in conftest.py."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "actor", "the", "a", "was", "is", "very",
         "not", "story", "scene", "hello", "hi", "how", "are", "you", "fine", "thanks", "what", "name", "my",
         "bot", "user", "assistant", "?", "!", ".", ","]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def _tokenizer(cls_sep: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_bert(folder: Path, head: bool = True) -> Path:
    """A tiny BERT classifier; `head=False` saves the bare encoder (as sentence-transformers models ship)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    (BertForSequenceClassification(cfg) if head else BertModel(cfg)).save_pretrained(folder)
    _tokenizer(cls_sep=True).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, chat: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                      initializer_range=0.3)  # large enough embeddings that a frozen head can express a peaked output
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = _tokenizer(cls_sep=False)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Learnable toy sentiment: label 1 iff a positive word is present."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(["good", "great"] if label else ["bad", "awful"])
        filler = rng.choices(["the", "movie", "film", "plot", "was", "very", "story", "scene", "actor"],
                             k=rng.randint(2, 9))
        filler.insert(rng.randint(0, len(filler)), word)
        rows.append({"text": " ".join(filler), "label": label})
    return rows


def chat_rows(n: int = 24) -> list[dict]:
    prompts = ["hello", "hi", "how are you ?", "what is my name ?", "hello bot", "hi bot"]
    answers = ["hi !", "hello !", "fine thanks .", "you are bot .", "hi you !", "hello you !"]
    return [{"prompt": prompts[i % 6], "response": answers[i % 6]} for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter.safetensors"))


def process_env(**extra: str) -> dict[str, str]:
    """The environment for a test's child process: one thread, offline, this checkout's src and tests first."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
