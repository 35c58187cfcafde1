"""Hostile adapter and checkpoint files, as one table (`CASES`) through one check: each is refused with
a clear error (`AdapterFileError`, or `CheckpointError` for a checkpoint) that names the damaged file
and says what to do, and the model is left exactly as it was (weights bit for bit, modules,
``requires_grad``; for a checkpoint also the optimizer and the random generators). Nothing a file
names is imported or run (`test_nothing_a_file_names_is_imported_or_run`), and no header reaches
safetensors before it is checked against the file's real size (`test_absurd_headers_never_reach_safetensors`).

Kinds: a peftkit adapter folder, a Hugging Face PEFT adapter folder, a multi-adapter folder, and a
training checkpoint from a tiny `peftkit.train` run. Damage that also fixes up the checksums a file
records (`reseal_*`) is a crafted file: it exercises the checks behind the checksum.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from models import BUILDERS
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.files.checked import sha256_file
from peftkit.errors import AdapterFileError, CheckpointError
from peftkit.train import checkpoint as ckpt

PK, HF, MULTI, CKPT = "peftkit", "hf-peft", "multi", "checkpoint"
REMEDY = re.compile(r"save the adapter again|resume from another checkpoint|start the run again|upgrade peftkit|"
                    r"copy the file|convert it with PEFT|to null in the file|train it again|resume with the same|"
                    r"load it with PEFT itself",
                    re.IGNORECASE)
PROBE_MODULE = "peftkit_hostile_probe"  # a module a file names; importing it would write a marker file
Damage = Callable[[Path, Path], None]  # (folder to damage, a folder outside it)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    damage: Damage
    file: str  # the file the error must name
    match: str  # what the error must say (regex)
    early: bool = False  # refused before safetensors reads the file

    def __repr__(self) -> str:
        return self.id


# -- raw file surgery ----------------------------------------------------------------------------
def raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes, n: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)


def first_tensor(header: dict, suffix: str = "") -> str:
    return next(k for k in sorted(header) if k != "__metadata__" and k.endswith(suffix))


def reseal_adapter(folder: Path) -> None:
    """Record the current size and SHA-256 of adapter.safetensors in adapter.json (a crafted file)."""
    meta = json.loads((folder / "adapter.json").read_text())
    weights = folder / "adapter.safetensors"
    meta["files"] = {weights.name: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    (folder / "adapter.json").write_text(json.dumps(meta))


def reseal_checkpoint(folder: Path, edit: Callable[[dict], None] = lambda doc: None) -> None:
    """Apply `edit` to trainer.json and record every file's current size and SHA-256, and its own."""
    reseal_adapter(folder)
    doc = json.loads((folder / "trainer.json").read_text())
    edit(doc)
    doc["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                    for p in sorted(folder.iterdir()) if p.name != "trainer.json"}
    doc["sha256"] = ckpt.doc_sha256(doc)
    (folder / "trainer.json").write_text(json.dumps(doc))


def resealer(kind: str) -> Callable[[Path], None]:
    return {PK: reseal_adapter, CKPT: reseal_checkpoint}.get(kind, lambda folder: None)


# -- damage ----------------------------------------------------------------------------------------------
def truncate(name: str, fraction: float) -> Damage:
    def damage(folder: Path, outside: Path) -> None:
        blob = (folder / name).read_bytes()
        (folder / name).write_bytes(blob[: int(len(blob) * fraction)])
    return damage


def flip(name: str, where: Callable[[bytes], int], bit: int = 0) -> Damage:
    def damage(folder: Path, outside: Path) -> None:
        blob = bytearray((folder / name).read_bytes())
        blob[where(bytes(blob))] ^= 1 << bit
        (folder / name).write_bytes(bytes(blob))
    return damage


def after(token: bytes) -> Callable[[bytes], int]:
    return lambda blob: blob.index(token, 8) + len(token)


def data_at(fraction: float) -> Callable[[bytes], int]:
    def where(blob: bytes) -> int:
        start = 8 + int.from_bytes(blob[:8], "little")
        return min(len(blob) - 1, start + int((len(blob) - start) * fraction))
    return where


def edit_tensors(name: str, edit: Callable[[dict[str, torch.Tensor]], None], reseal: Callable[[Path], None]) -> Damage:
    """Rewrite a safetensors file with edited tensors (without peftkit's metadata checksum)."""
    def damage(folder: Path, outside: Path) -> None:
        tensors = load_file(str(folder / name))
        edit(tensors)
        save_file(tensors, str(folder / name))
        reseal(folder)
    return damage


def retype(suffix: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith(suffix))
        tensors[key] = (tensors[key] * 100).to(dtype)
    return edit


def poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
        tensors[key] = tensors[key].clone().reshape(-1).index_fill(0, torch.tensor([0]), value).reshape(tensors[key].shape)
    return edit


def edit_header(name: str, edit: Callable[[dict], bytes | dict | None], reseal: Callable[[Path], None],
                n: int | None = None) -> Damage:
    """Rewrite a safetensors header (the data stays): `edit` changes it in place or returns new text."""
    def damage(folder: Path, outside: Path) -> None:
        header, data = raw(folder / name)
        new = edit(header)
        write_raw(folder / name, header if new is None else new, data, n)
        reseal(folder)
    return damage


def entry(key_suffix: str = "", **fields: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[first_tensor(header, key_suffix)].update(fields)
    return edit


def rename_tensor(new: str) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[new] = header.pop(first_tensor(header))
    return edit


def duplicate_tensor(header: dict) -> bytes:
    key = first_tensor(header)
    text = json.dumps(header)
    return (text[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}").encode()


def edit_json(name: str, edit: Callable[[dict], None], reseal: Callable[[Path], None] = lambda folder: None) -> Damage:
    def damage(folder: Path, outside: Path) -> None:
        doc = json.loads((folder / name).read_text())
        edit(doc)
        (folder / name).write_text(json.dumps(doc))
        reseal(folder)
    return damage


def setting(**values: object) -> Callable[[dict], None]:
    return lambda doc: doc.update(values)


def replace_text(name: str, content: bytes) -> Damage:
    def damage(folder: Path, outside: Path) -> None:
        (folder / name).write_bytes(content)
    return damage


def link_out(name: str, dangling: bool = False) -> Damage:
    """Replace `name` with a link to a copy of it outside the folder (or to nothing there)."""
    def damage(folder: Path, outside: Path) -> None:
        target = outside / f"elsewhere-{name}"
        if not dangling:
            shutil.move(folder / name, target)
        else:
            shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
        (folder / name).symlink_to(target)
    return damage


def fifo(name: str) -> Damage:
    def damage(folder: Path, outside: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return damage


def pickle_weights(folder: Path, outside: Path) -> None:
    """PEFT's legacy adapter_model.bin, crafted to write a marker file when unpickled."""
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(outside / 'unpickled')!r}, 'w').write('ran')",)

    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": Payload()}))


DEEP = b"[" * 100_000 + b"]" * 100_000
NESTED = json.dumps(json.loads("{\"a\": " * 40 + "1" + "}" * 40)).encode()
HUGE = b" " * (5 << 20) + b"{}"
BIG_NUMBER = b'{"format": "peftkit", "format_version": ' + b"9" * 10_000 + b"}"
JSON_BOMBS = {"not-json": b"{ not json", "binary": b"\xff\xfe\x00garbage", "array": b"[1, 2, 3]", "deep": DEEP,
              "nested": NESTED, "huge": HUGE, "big-number": BIG_NUMBER, "duplicate-keys": b'{"format": 1, "format": 2}'}


# -- the table ------------------------------------------------------------------------------------------------
FILES = {PK: ["adapter.safetensors", "adapter.json"], HF: ["adapter_model.safetensors", "adapter_config.json"],
         MULTI: ["adapters.json"],
         CKPT: ["adapter.safetensors", "adapter.json", "optimizer.safetensors", "rng.safetensors", "trainer.json"]}
WEIGHTS = {PK: "adapter.safetensors", HF: "adapter_model.safetensors", CKPT: "optimizer.safetensors"}
CONFIG = {PK: "adapter.json", HF: "adapter_config.json", MULTI: "adapters.json", CKPT: "trainer.json"}


def truncations() -> list[Case]:
    return [Case(f"{kind}-truncated-{name}-at-{tenth}0%", kind, truncate(name, tenth / 10), name,
                 r"truncated|not readable JSON|does not match|too short", early=True)
            for kind, names in FILES.items() for name in names for tenth in range(10)]


def bit_flips() -> list[Case]:
    spots = {"length-low": (lambda b: 0, 3), "length-high": (lambda b: 5, 7), "brace": (lambda b: 8, 4),
             "dtype": (after(b'"dtype":"'), 0), "shape": (after(b'"shape":['), 0),
             "offsets": (after(b'"data_offsets":['), 0), "name": (after(b'lora'), 1),
             "data-first": (data_at(0.0), 0), "data-middle": (data_at(0.5), 6), "data-last": (data_at(1.0), 0)}
    cases = []
    for kind in (PK, HF, CKPT):
        name = WEIGHTS[kind]
        for spot, (where, bit) in spots.items():
            if kind == CKPT and spot == "name":
                continue
            cases.append(Case(f"{kind}-bitflip-{spot}-{name}", kind, flip(name, where, bit), name,
                              r"corrupted|truncated|not readable JSON|does not match|malformed|not a dotted name"))
    cases += [
        Case("checkpoint-bitflip-rng-data", CKPT, flip("rng.safetensors", data_at(0.5), 2), "rng.safetensors",
             "does not match"),
        Case("checkpoint-bitflip-adapter-data", CKPT, flip("adapter.safetensors", data_at(0.3), 1),
             "adapter.safetensors", "does not match"),
        Case("checkpoint-bitflip-step", CKPT, flip("trainer.json", after(b'"step": '), 0), "trainer.json",
             "SHA-256"),
        Case("checkpoint-bitflip-adapter-json", CKPT, flip("adapter.json", after(b'"r": '), 0), "adapter.json",
             "does not match"),
    ]
    return cases


def wrong_dtypes() -> list[Case]:
    pk, hf = resealer(PK), resealer(HF)
    return [
        Case("peftkit-int8-tensor", PK, edit_tensors(WEIGHTS[PK], retype("", torch.int8), pk), WEIGHTS[PK], "I8"),
        Case("peftkit-float64-tensor", PK, edit_tensors(WEIGHTS[PK], retype("", torch.float64), pk), WEIGHTS[PK],
             "dtype mismatch.*float64"),
        Case("peftkit-bool-tensor", PK, edit_tensors(WEIGHTS[PK], retype("", torch.bool), pk), WEIGHTS[PK],
             "dtype mismatch.*bool"),
        Case("peftkit-int64-tensor", PK, edit_tensors(WEIGHTS[PK], retype("", torch.int64), pk), WEIGHTS[PK], "I64"),
        Case("hf-peft-int8-tensor", HF, edit_tensors(WEIGHTS[HF], retype("", torch.int8), hf), WEIGHTS[HF], "I8"),
        Case("hf-peft-float64-tensor", HF, edit_tensors(WEIGHTS[HF], retype("", torch.float64), hf), WEIGHTS[HF],
             "dtype mismatch.*float64"),
        Case("hf-peft-bool-tensor", HF, edit_tensors(WEIGHTS[HF], retype("", torch.bool), hf), WEIGHTS[HF], "BOOL"),
        Case("checkpoint-int8-moment", CKPT, edit_tensors(WEIGHTS[CKPT], retype("exp_avg", torch.int8), reseal_checkpoint),
             WEIGHTS[CKPT], "exp_avg.*int8"),
        Case("checkpoint-float64-moment", CKPT,
             edit_tensors(WEIGHTS[CKPT], retype("exp_avg_sq", torch.float64), reseal_checkpoint), WEIGHTS[CKPT],
             "exp_avg_sq.*float64"),
        Case("checkpoint-float-rng", CKPT, edit_tensors("rng.safetensors", retype("torch", torch.float32),
                                                        reseal_checkpoint), "rng.safetensors", "generator state"),
        Case("checkpoint-int8-adapter", CKPT, edit_tensors("adapter.safetensors", retype("", torch.int8),
                                                           reseal_checkpoint), "adapter.safetensors", "I8"),
    ]


def absurd_sizes() -> list[Case]:
    cases = []
    for kind in (PK, HF, CKPT):
        name, reseal = WEIGHTS[kind], resealer(kind)
        keep = lambda header: None  # noqa: E731
        cases += [
            Case(f"{kind}-header-claims-2^40-bytes", kind, edit_header(name, keep, reseal, n=1 << 40), name,
                 "header claims", early=True),
            Case(f"{kind}-header-claims-2^64-bytes", kind, edit_header(name, keep, reseal, n=(1 << 64) - 1), name,
                 "header claims", early=True),
            Case(f"{kind}-tensor-of-2^40-elements", kind,
                 edit_header(name, entry(shape=[1 << 40], data_offsets=[0, 1 << 42]), reseal), name,
                 "does not fit bytes", early=True),
            Case(f"{kind}-shape-of-2^40-in-small-offsets", kind, edit_header(name, entry(shape=[1 << 40]), reseal),
                 name, "does not fit bytes", early=True),
            Case(f"{kind}-2^62-by-2^62-shape", kind, edit_header(name, entry(shape=[1 << 62, 1 << 62]), reseal), name,
                 "does not fit bytes", early=True),
            Case(f"{kind}-negative-dimension", kind, edit_header(name, entry(shape=[-4, 8]), reseal), name,
                 "malformed", early=True),
        ]
    return cases


def names() -> list[Case]:
    pk, hf = resealer(PK), resealer(HF)
    index = "adapters.json"
    return [
        Case("peftkit-duplicate-tensor", PK, edit_header(WEIGHTS[PK], duplicate_tensor, pk), WEIGHTS[PK], "twice",
             early=True),
        Case("hf-peft-duplicate-tensor", HF, edit_header(WEIGHTS[HF], duplicate_tensor, hf), WEIGHTS[HF], "twice",
             early=True),
        Case("peftkit-traversal-tensor-name", PK, edit_header(WEIGHTS[PK], rename_tensor("../../x"), pk), WEIGHTS[PK],
             "not a dotted name", early=True),
        Case("peftkit-absolute-tensor-name", PK, edit_header(WEIGHTS[PK], rename_tensor("/etc/passwd"), pk),
             WEIGHTS[PK], "not a dotted name", early=True),
        Case("hf-peft-traversal-tensor-name", HF, edit_header(WEIGHTS[HF], rename_tensor("a/../../b"), hf), WEIGHTS[HF],
             "not a dotted name", early=True),
        Case("peftkit-traversal-adapter-name", PK, edit_json("adapter.json", setting(name="../other")), "adapter.json",
             "adapter name"),
        Case("peftkit-absolute-adapter-name", PK, edit_json("adapter.json", setting(name="/tmp/x")), "adapter.json",
             "adapter name"),
        Case("multi-traversal-name", MULTI, edit_json(index, setting(adapters=["../other"])), index, "not paths"),
        Case("multi-absolute-name", MULTI, edit_json(index, setting(adapters=["/etc"])), index, "not paths"),
        Case("multi-nested-path-name", MULTI, edit_json(index, setting(adapters=["default/../other"])), index,
             "not paths"),
        Case("multi-empty-name", MULTI, edit_json(index, setting(adapters=[""])), index, "not paths"),
        Case("multi-duplicate-name", MULTI, edit_json(index, setting(adapters=["default", "default"])), index, "twice"),
        Case("multi-names-not-a-list", MULTI, edit_json(index, setting(adapters="default")), index,
             "no list of adapter names"),
        Case("checkpoint-traversal-controller", CKPT, lambda folder, outside: reseal_checkpoint(
            folder, setting(controllers=["../../x"])), "trainer.json", "controllers"),
    ]


def links() -> list[Case]:
    outside = "outside its folder"
    return [
        Case("peftkit-weights-link-out", PK, link_out(WEIGHTS[PK]), WEIGHTS[PK], outside),
        Case("peftkit-json-link-out", PK, link_out("adapter.json"), "adapter.json", outside),
        Case("peftkit-dangling-link", PK, link_out(WEIGHTS[PK], dangling=True), WEIGHTS[PK], outside),
        Case("peftkit-json-fifo", PK, fifo("adapter.json"), "adapter.json", "not a regular file"),
        Case("hf-peft-weights-link-out", HF, link_out(WEIGHTS[HF]), WEIGHTS[HF], outside),
        Case("hf-peft-config-link-out", HF, link_out("adapter_config.json"), "adapter_config.json", outside),
        Case("multi-index-link-out", MULTI, link_out("adapters.json"), "adapters.json", outside),
        Case("multi-subfolder-link-out", MULTI, link_out("other"), "other", "a link"),
        Case("checkpoint-optimizer-link-out", CKPT, link_out("optimizer.safetensors"), "optimizer.safetensors", outside),
        Case("checkpoint-state-link-out", CKPT, link_out("trainer.json"), "trainer.json", outside),
    ]


def json_bombs() -> list[Case]:
    cases = []
    for kind, name in CONFIG.items():
        for what, content in JSON_BOMBS.items():
            if kind != PK and what in ("big-number", "binary", "array"):
                continue
            cases.append(Case(f"{kind}-{what}-{name}", kind, replace_text(name, content), name,
                              r"not readable JSON|JSON object|nested|over 4 MiB|twice"))
    return cases


def versions_and_structure() -> list[Case]:
    meta, state = "adapter.json", "trainer.json"
    return [
        Case("peftkit-newer-format", PK, edit_json(meta, setting(format_version=2)), meta, "Upgrade peftkit"),
        Case("peftkit-version-as-text", PK, edit_json(meta, setting(format_version="1")), meta, "format_version"),
        Case("peftkit-version-zero", PK, edit_json(meta, setting(format_version=0)), meta, "format_version"),
        Case("peftkit-config-not-a-mapping", PK, edit_json(meta, setting(config=[1, 2])), meta, "malformed"),
        Case("peftkit-shapes-malformed", PK, edit_json(meta, lambda m: m["base"].update(shapes={"x/../y": 5})), meta,
             "malformed"),
        Case("peftkit-sketch-malformed", PK, edit_json(meta, lambda m: m["base"].update(
            sketch={"model.layers.0.self_attn.q_proj": {"weight": "x"}})), meta, "malformed"),
        Case("peftkit-file-record-malformed", PK, edit_json(meta, setting(files={WEIGHTS[PK]: {"bytes": "10"}})), meta,
             "malformed"),
        Case("peftkit-unknown-method", PK, edit_json(meta, lambda m: m["config"].update(method="os.system")), meta,
             "invalid method config"),
        Case("peftkit-nan-weight", PK, edit_tensors(WEIGHTS[PK], poison(float("nan")), reseal_adapter), WEIGHTS[PK],
             "NaN or infinite"),
        Case("hf-peft-inf-weight", HF, edit_tensors(WEIGHTS[HF], poison(float("inf")), lambda f: None), WEIGHTS[HF],
             "NaN or infinite"),
        Case("hf-peft-value-changed-under-checksum", HF, lambda folder, outside: _scale_keeping_metadata(folder),
             WEIGHTS[HF], "SHA-256"),
        Case("hf-peft-copies-not-names", HF, edit_json("adapter_config.json", setting(modules_to_save=[{"a": 1}])),
             "adapter_config.json", "modules_to_save"),
        Case("hf-peft-rank-not-a-number", HF, edit_json("adapter_config.json", setting(r="eight")), "adapter_config.json",
             "cannot read PEFT adapter"),
        Case("checkpoint-newer-version", CKPT, lambda folder, outside: reseal_checkpoint(folder, setting(version=ckpt.SHARDED_VERSION + 1)),
             state, "newer peftkit"),
        Case("checkpoint-negative-step", CKPT, lambda folder, outside: reseal_checkpoint(folder, setting(step=-1)),
             state, "malformed"),
        Case("checkpoint-python-rng-malformed", CKPT, lambda folder, outside: reseal_checkpoint(
            folder, setting(python_rng=[3, [1, 2], None])), state, "python_rng"),
        Case("checkpoint-param-groups-malformed", CKPT, lambda folder, outside: reseal_checkpoint(
            folder, lambda d: d["optimizer"].update(param_groups="x")), state, "param_groups"),
        Case("checkpoint-unrecorded-file", CKPT, lambda folder, outside: reseal_checkpoint(
            folder, lambda d: d["controllers"].append("default")), state, "records other files"),
        Case("checkpoint-moment-of-no-parameter", CKPT, edit_tensors(WEIGHTS[CKPT], _rename_moment, reseal_checkpoint),
             WEIGHTS[CKPT], "names no state"),
        Case("checkpoint-extra-rng-tensor", CKPT, edit_tensors("rng.safetensors", lambda t: t.update(
            evil=torch.zeros(3)), reseal_checkpoint), "rng.safetensors", "not generator states"),
    ]


def _scale_keeping_metadata(folder: Path) -> None:
    path = folder / WEIGHTS[HF]
    header, data = raw(path)
    tensors = load_file(str(path))
    key = first_tensor(header)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, str(path), metadata=header["__metadata__"])


def _rename_moment(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("exp_avg"))
    tensors["999." + key.partition(".")[2]] = tensors.pop(key)


def remote_code() -> list[Case]:
    conf = "adapter_config.json"
    asks = "asks for code to be imported"
    return [
        Case("hf-peft-auto-mapping-outside-transformers", HF, edit_json(conf, setting(auto_mapping={
            "base_model_class": "Model", "parent_library": PROBE_MODULE})), conf, asks),
        Case("hf-peft-auto-mapping-module-path-class", HF, edit_json(conf, setting(auto_mapping={
            "base_model_class": f"{PROBE_MODULE}.Model", "parent_library": "transformers.models.llama"})), conf, asks),
        Case("hf-peft-auto-mapping-remote-module", HF, edit_json(conf, setting(auto_mapping={
            "base_model_class": "Model", "parent_library": "transformers_modules.evil.model"})), conf, asks),
        Case("hf-peft-trust-remote-code", HF, edit_json(conf, setting(trust_remote_code=True)), conf, asks),
        Case("hf-peft-auto-map", HF, edit_json(conf, setting(auto_map={"AutoModel": f"{PROBE_MODULE}.Model"})), conf,
             asks),
        Case("hf-peft-base-model-class", HF, edit_json(conf, setting(base_model_class=f"{PROBE_MODULE}.Model")), conf,
             asks),
        Case("hf-peft-custom-peft-type", HF, edit_json(conf, setting(peft_type=f"{PROBE_MODULE}.Tuner")), conf,
             "cannot read PEFT adapters of type"),
        Case("hf-peft-peft-type-not-a-name", HF, edit_json(conf, setting(peft_type=["LORA"])), conf, "peft_type"),
        Case("hf-peft-pickle-weights", HF, pickle_weights, "adapter_model.bin",
             "pickle file.*does not open it.*PeftModel.from_pretrained"),
    ]


CASES = truncations() + bit_flips() + wrong_dtypes() + absurd_sizes() + names() + links() + json_bombs() \
    + versions_and_structure() + remote_code()


# -- fixtures and the check ---------------------------------------------------------------------------------
def _run_config(bert_dir: Path, sentiment_csv: Path, out: Path):
    from peftkit.train.config import TrainConfig

    return TrainConfig(model=str(bert_dir), data=str(sentiment_csv), out=str(out), batch_size=8, max_steps=2,
                       lr=5e-3, progress=False, eval_fraction=0.25, seed=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, bert_dir, sentiment_csv) -> dict[str, Path]:
    """One folder of each kind, intact."""
    from peftkit.train.run import train

    root = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config("lora", r=4))
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tuned.save(root / PK)
    tuned.save(root / HF, format="hf-peft")
    peftkit.attach(tuned, peftkit.config("lora", r=2, targets=["k_proj"]), name="other")
    tuned.save(root / MULTI)
    train(_run_config(bert_dir, sentiment_csv, root / "run"), echo=lambda _s: None)
    return {PK: root / PK, HF: root / HF, MULTI: root / MULTI, CKPT: root / "run" / "checkpoint"}


def _trainer(bert_dir: Path, sentiment_csv: Path, out: Path):
    from peftkit.train.distributed import Dist
    from peftkit.train.run import _prepare, plan
    from peftkit.train.trainer import Trainer

    job = plan(_run_config(bert_dir, sentiment_csv, out))
    tok, prepared, tuned = _prepare(job, Dist())
    return Trainer(tuned, prepared, job.cfg, out=out, pad_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, bert_dir, sentiment_csv):
    """A trainer set up as the checkpoint's run was; every refused resume must leave it as it is."""
    return _trainer(bert_dir, sentiment_csv, tmp_path_factory.mktemp("resume"))


def snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [(name, type(m).__name__) for name, m in model.named_modules()])


def assert_untouched(model: torch.nn.Module, snap: tuple) -> None:
    state, flags, modules = snap
    assert [(name, type(m).__name__) for name, m in model.named_modules()] == modules
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)


def optimizer_state(optimizer: torch.optim.Optimizer) -> str:
    return repr(optimizer.state_dict())  # tensors print their values: equal text, equal state


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file_is_refused_cleanly(case: Case, pristine, trainer, tmp_path, monkeypatch) -> None:
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(pristine[case.kind], folder, symlinks=True)
    case.damage(folder, outside)
    if case.early:
        from peftkit.core.files import checked

        real_load = checked.load_file

        def guarded(path, *args, **kwargs):
            assert Path(path).name != case.file, "safetensors was handed the damaged file"
            return real_load(path, *args, **kwargs)
        monkeypatch.setattr(checked, "load_file", guarded)
    if case.kind == CKPT:
        model, optimizer = trainer.tuned, trainer.optimizer
        snap, opt, rng, py_rng, state = (snapshot(model), optimizer_state(optimizer), torch.get_rng_state(),
                                         random.getstate(), dict(trainer.state))
        with pytest.raises(CheckpointError) as refused:
            trainer.resume(folder)
        assert optimizer_state(optimizer) == opt and torch.equal(torch.get_rng_state(), rng)
        assert random.getstate() == py_rng and trainer.state == state
    else:
        model = BUILDERS["llama"]()
        snap = snapshot(model)
        with pytest.raises(AdapterFileError) as refused:
            peftkit.load(model, folder)
    assert_untouched(model, snap)
    message = str(refused.value)
    assert re.search(case.match, message), message
    assert case.file in message, message
    assert REMEDY.search(message), f"no remedy in: {message}"
    assert "\n" not in message
    assert not (outside / "unpickled").exists()


def test_the_table_is_large_and_distinct() -> None:
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind", [PK, HF, MULTI])
def test_intact_adapters_load(kind, pristine, tmp_path) -> None:
    """The control: the same folders, undamaged, load (so each refusal above is the damage's doing)."""
    shutil.copytree(pristine[kind], tmp_path / "folder")
    tuned = peftkit.load(BUILDERS["llama"](), tmp_path / "folder")
    assert tuned.adapters == (["default", "other"] if kind == MULTI else ["default"])


def test_intact_checkpoint_resumes(pristine, bert_dir, sentiment_csv, tmp_path) -> None:
    shutil.copytree(pristine[CKPT], tmp_path / "folder")
    trainer = _trainer(bert_dir, sentiment_csv, tmp_path / "run")
    trainer.resume(tmp_path / "folder")
    assert trainer.state["step"] == 2 and trainer.optimizer.state


def test_links_inside_the_folder_and_into_a_hub_cache_are_followed(pristine, tmp_path) -> None:
    """A link to another file of the same folder is fine, and so is the Hugging Face cache layout
    (``snapshots/<rev>/file`` -> ``blobs/<hash>``)."""
    folder = tmp_path / "folder"
    shutil.copytree(pristine[PK], folder)
    (folder / "adapter.json").rename(folder / "real.json")
    (folder / "adapter.json").symlink_to("real.json")
    peftkit.load(BUILDERS["llama"](), folder)
    repo = tmp_path / "models--user--adapter"
    snapshot_dir = repo / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in pristine[HF].iterdir():
        shutil.copy(path, repo / "blobs" / sha256_file(path))
        (snapshot_dir / path.name).symlink_to(Path("../../blobs") / sha256_file(path))
    assert peftkit.load(BUILDERS["llama"](), snapshot_dir).adapters == ["default"]


def test_nothing_a_file_names_is_imported_or_run(pristine, tmp_path, monkeypatch) -> None:
    """Every file in the table that names a module, a class or a pickle: the module is importable
    (and would leave a marker if imported), yet it is never imported and the pickle never runs."""
    marker = tmp_path / "imported"
    (tmp_path / f"{PROBE_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Model:\n    pass\nclass Tuner:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    naming = [c for c in CASES if c.id in {r.id for r in remote_code()}]
    for case in naming:
        folder = tmp_path / case.id
        shutil.copytree(pristine[case.kind], folder)
        case.damage(folder, tmp_path)
        with pytest.raises(AdapterFileError):
            peftkit.load(BUILDERS["llama"](), folder)
    assert not marker.exists() and PROBE_MODULE not in __import__("sys").modules
    assert not (tmp_path / "unpickled").exists()


def test_absurd_headers_never_reach_safetensors(tmp_path, monkeypatch) -> None:
    """A header claiming far more than the file holds is refused from the header alone; the largest
    read is the header itself, bounded by the file's real size."""
    from peftkit.core.files.checked import header

    path = tmp_path / "x.safetensors"
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Counting(real_open(p, mode, *a, **k))
                        if Path(p).resolve() == path.resolve() else real_open(p, mode, *a, **k))
    for text, n in [(b'{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}', None),
                    (b"{}", 1 << 62)]:
        write_raw(path, text, b"\0" * 16, n)
        reads.clear()
        with pytest.raises(AdapterFileError, match="header claims|does not fit"):
            header(path)
        assert max(reads) <= path.stat().st_size
