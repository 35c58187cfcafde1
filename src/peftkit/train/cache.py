"""Tokenise once: token ids cached on disk under a hash of (tokenizer, options, texts).

The cache lives in ``<peftkit cache>/tokens/<sha256>.safetensors`` (flat ids + offsets, no
pickle), is written to a temporary file and renamed, and is simply recomputed when unreadable.
``PEFTKIT_TOKEN_CACHE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_file
from . import assets

VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how `tokenizer` splits text (memoised on the tokenizer)."""
    known = getattr(tokenizer, "_peftkit_fingerprint", None)
    if known is not None:
        return known
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizers: the vocabulary and class are what we can see
        body = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                        sorted(map(str, tokenizer.all_special_tokens))])
    digest = hashlib.sha256((body + extra).encode("utf-8")).hexdigest()
    with contextlib.suppress(AttributeError):
        tokenizer._peftkit_fingerprint = digest
    return digest


def _key(tokenizer: Any, texts: list[str], options: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"v{VERSION}\0{tokenizer_fingerprint(tokenizer)}\0{json.dumps(options)}".encode())
    for t in texts:
        b = t.encode("utf-8")
        digest.update(len(b).to_bytes(8, "little"))
        digest.update(b)
    return digest.hexdigest()


def _tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), 2048):
        chunk = texts[start:start + 2048]
        enc = tokenizer(chunk, add_special_tokens=add_special_tokens, truncation=max_length is not None,
                        max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
        out.extend(enc["input_ids"])
    return out


def tokenize_cached(tokenizer: Any, texts: list[str], *, add_special_tokens: bool,
                    max_length: int | None) -> list[list[int]]:
    """Token ids of each text, from the disk cache when the same request was seen before."""
    if not texts:
        return []
    options = {"special": add_special_tokens, "max_length": max_length}
    if os.environ.get("PEFTKIT_TOKEN_CACHE", "1") == "0":
        return _tokenize(tokenizer, texts, add_special_tokens, max_length)
    path = assets.cache_dir() / "tokens" / f"{_key(tokenizer, texts, options)}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            ids, offsets = stored["ids"].tolist(), stored["offsets"].tolist()
            if len(offsets) == len(texts) + 1:
                return [ids[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
        except Exception:  # a damaged cache entry is recomputed, never fatal
            pass
    seqs = _tokenize(tokenizer, texts, add_special_tokens, max_length)
    _store(path, seqs)
    return seqs


def _store(path: Any, seqs: list[list[int]]) -> None:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    try:
        with atomic_file(path) as tmp:
            save_file({"ids": ids, "offsets": offsets}, str(tmp))
    except OSError:  # a read-only or full cache only costs speed
        pass
