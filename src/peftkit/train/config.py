"""The run configuration: one flat dataclass that a YAML file and command-line flags both fill.

Precedence: built-in defaults < ``--config FILE`` < flags. Unknown keys in the file are errors
with a suggestion (``lerning_rate`` → ``lr``). ``method_options`` values are YAML scalars or lists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..core.config import type_problems
from ..errors import ConfigError, did_you_mean, shown
from .precision import PRECISIONS
from .recipes import recipe

TASKS = ("classification", "instruction", "lm")
# what evaluation reports per task: the metrics --metric may name
METRICS = {"classification": ("accuracy", "macro_f1", "loss"), "instruction": ("loss", "perplexity"),
           "lm": ("loss", "perplexity")}
FORMATS = ("peftkit", "hf-peft")
DEFAULT_METHOD = "lora"  # with the method's recommended training options (LoRA: every linear layer)
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
STRATEGIES = ("auto", "ddp", "fsdp")
MAX_OPTION_DEPTH = 32  # nesting of a --method-options value


def _field(default: Any, help: str, **meta: Any) -> Any:
    """A TrainConfig field; its metadata makes the ``peftkit train`` flag (see `peftkit.cli.train`):
    ``help``, optional ``choices``, ``metavar``, and ``const`` (the value of the bare flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. Field names are the YAML keys; flags use dashes (``--batch-size``).
    A None default means "decided by the task, the data or the method", as its help says."""

    model: str = _field("minilm", "embedded name (minilm, smollm2) or a local Hugging Face model folder")
    task: str | None = _field(None, "what to train: classification, instruction (loss on the response only) or lm "
                                     "[from the data and model]", choices=TASKS)
    data: str = _field("rotten-tomatoes", "embedded name (rotten-tomatoes, chatterbot, hamlet) or a "
                                          "CSV / JSONL / JSON / Parquet / text file")
    eval_data: str | None = _field(None, "held-out file [a fixed hash split of --data]")
    eval_fraction: float = _field(0.1, "held-out share when the data has no split of its own")
    text_field: str | None = _field(None, "column holding the text [text, sentence, content, ...]")
    label_field: str | None = _field(None, "column holding the label [label, labels, category, ...]")
    prompt_field: str | None = _field(None, "column holding the prompt [prompt, instruction, question, input]")
    response_field: str | None = _field(None, "column holding the response [response, output, answer, completion]")
    method: str | None = _field(None, f"a registered method (`peftkit methods`) [{DEFAULT_METHOD}]")
    method_options: dict[str, Any] | None = _field(
        None, "k=v,... over the method's recommended training options (`peftkit methods`; LoRA: every linear "
              "layer), e.g. r=16,alpha=32,targets=[query,value] (YAML values)", metavar="K=V,...")
    quantize: str | None = _field(None, "quantize the frozen base (QLoRA-style)", choices=("nf4", "fp4", "int8"))
    optimizer: str = _field("adamw", "the optimizer", choices=OPTIMIZERS)
    lr: float | None = _field(None, "peak learning rate [the method's recommended rate (`peftkit methods`), else "
                                    "2e-3 for instruction, 1e-3 otherwise]")
    head_lr: float | None = _field(None, "peak learning rate of a new task head (classification) [the method's, "
                                         "else --lr]")
    base_dropout: float | None = _field(None, "dropout probability inside the frozen base model (0: off) [the "
                                              "method's recommended one (`peftkit methods`), else the model's own]")
    probe_head: bool | None = _field(None, "fit a new classification head by logistic regression on the untrained "
                                           "model's features before training [the method's choice: soft prompts do]")
    weight_decay: float = _field(0.0, "AdamW weight decay of the trained parameters")
    schedule: str = _field("linear", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup: float = _field(0.06, "warmup: a fraction of the steps (< 1) or a number of steps")
    max_grad_norm: float = _field(1.0, "clip the gradients' global norm to this (0: off). On at 1.0 by default, as "
                                       "in Hugging Face's Trainer and most fine-tuning recipes: it bounds how far one "
                                       "outlier batch can move the weights. A NaN or infinite loss or gradient stops "
                                       "the run either way, keeping the last checkpoint")
    batch_size: int | None = _field(None, "examples per process per micro-batch [32 classification, 8 otherwise]")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    max_length: int | None = _field(None, "tokens per example [128 classification, 256 otherwise]")
    epochs: float = _field(1.0, "passes over the training data")
    max_steps: int | None = _field(None, "optimizer steps (overrides --epochs)")
    eval_every: int | None = _field(None, "evaluate (and keep the best adapter) every N steps [at the end only]")
    eval_batch_size: int | None = _field(None, "examples per evaluation batch [128 classification, 16 otherwise]")
    max_eval_examples: int | None = _field(None, "evaluate on at most N held-out examples: a fixed, seeded sample, "
                                                 "the same for every run and every `peftkit eval` [all]")
    save_every: int | None = _field(None, "checkpoint every N steps [--eval-every, or 200]")
    early_stopping: int | None = _field(None, "stop after N evaluations without improvement")
    metric: str | None = _field(None, "metric that picks the best adapter: accuracy, macro_f1 or loss for "
                                      "classification, loss or perplexity otherwise [accuracy for classification, "
                                      "else loss]")
    load_best: bool = _field(False, "finish with the best evaluated adapter instead of the last one")
    seed: int = _field(0, "seed of everything random: a new task head, the adapter's init, batch order, dropout")
    out: str | None = _field(None, "run folder [runs/<model>-<data>-<method>; with --resume FOLDER, that run's]")
    overwrite: bool = _field(False, "replace the run already in --out (finished or not) instead of refusing")
    resume: str | None = _field(None, "continue an interrupted run: bare, from <out>/checkpoint; or from the run "
                                      "folder or checkpoint folder given, with that run's settings and folder "
                                      "(flags given now win)", const="auto", metavar="FOLDER")
    format: str = _field("peftkit", "file format of the saved adapters (adapter/, best/); hf-peft: Hugging Face "
                                    "PEFT's layout, for methods that have one (checkpoints are always peftkit)",
                         choices=FORMATS)
    eval_before: bool | None = _field(None, "evaluate before training [for classification]")
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass: less memory, "
                                                 "more time")
    precision: str = _field("auto", "fp32; bf16 (bfloat16 base weights and autocast; adapters in fp32); fp16 (CUDA "
                                    "autocast with loss scaling); auto: bf16 where the device computes it natively, "
                                    "else fp32", choices=PRECISIONS)
    chunked_loss: bool = _field(True, "for causal LMs, compute the loss over the vocabulary in chunks, never "
                                      "holding all logits (much less memory); off: the model's own loss")
    fast_dropout: bool = _field(True, "on a CPU, draw the model's dropout masks (layers and attention probabilities) "
                                      "from 15 random bits per entry, the same keep share to 1/32768; off: PyTorch's "
                                      "own dropout")
    rebuild_inputs: bool = _field(True, "rebuild the inputs of LoRA and (IA)3 layers in backward from what their "
                                        "producers keep, instead of keeping them: the same gradients, less memory, "
                                        "a few percent more time on small CPU batches")
    group_by_length: bool = _field(True, "draw each batch from a length-sorted pool (less padding); "
                                         "--no-group-by-length for random batches")
    strategy: str = _field("auto", "with several processes (torchrun, accelerate launch): ddp keeps a whole model "
                                   "on each; fsdp shards the base and the adapters over them (FSDP2), for a base "
                                   "that does not fit one device; auto: ddp", choices=STRATEGIES)
    threads: int | None = _field(None, "torch CPU threads [torch's default]")
    tensorboard: bool = _field(False, "also log to <out>/tensorboard")
    progress: bool = _field(True, "show a progress bar on stderr")
    num_labels: int | None = _field(None, "number of classes, at least the data's (more leaves room for classes "
                                          "to come) [from the data]")
    calibration_batches: int = _field(4, "training batches for data-scored methods (SNIP / GraSP masks)")

    def resolved(self) -> TrainConfig:
        """A copy with the task-dependent defaults filled in."""
        task = self.task or "classification"
        method = self.method or DEFAULT_METHOD
        rec = recipe(method)
        return dataclasses.replace(
            self, method=method, method_options={**rec.options, **(self.method_options or {})},
            lr=self.lr if self.lr is not None else rec.lr_for(task),
            head_lr=self.head_lr if self.head_lr is not None else rec.head_lr,
            base_dropout=self.base_dropout if self.base_dropout is not None else rec.base_dropout,
            probe_head=self.probe_head if self.probe_head is not None else rec.probe_head,
            max_length=self.max_length if self.max_length is not None else (128 if task == "classification" else 256),
            batch_size=self.batch_size if self.batch_size is not None else (32 if task == "classification" else 8),
            eval_batch_size=self.eval_batch_size or (128 if task == "classification" else 16),
        )

    def problems(self) -> list[str]:
        """One message per invalid setting, each starting with the setting's name."""
        out = []
        for name, allowed in (("task", TASKS), ("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("format", FORMATS),
                              ("strategy", STRATEGIES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        every_metric = sorted({m for ms in METRICS.values() for m in ms})
        if self.metric is not None and self.metric not in every_metric:
            out.append(f"metric must be one of {', '.join(every_metric)}, got {self.metric!r}")
        for name in ("grad_accum", "calibration_batches"):
            if not _is_int(getattr(self, name), 1):
                out.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("batch_size", "eval_batch_size", "max_steps", "eval_every", "save_every", "early_stopping",
                     "max_length", "threads", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, 1):
                out.append(f"{name} must be a positive integer, got {value!r}")
        if self.num_labels is not None and not _is_int(self.num_labels, 2):
            out.append(f"num_labels must be an integer >= 2 (classification has at least two classes), got "
                       f"{self.num_labels!r}")
        if not _is_int(self.seed, 0):
            out.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (_is_number(self.epochs) and self.epochs > 0):
            out.append(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                out.append(f"{name} must be > 0, got {value!r}")
        for name, what in (("warmup", "a fraction of the steps (< 1) or a number of steps"),
                           ("max_grad_norm", "a norm (0: no clipping)"), ("weight_decay", "a decay factor")):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                out.append(f"{name} must be >= 0 ({what}), got {getattr(self, name)!r}")
        if self.base_dropout is not None and not (_is_number(self.base_dropout) and 0 <= self.base_dropout < 1):
            out.append(f"base_dropout must be in [0, 1), got {self.base_dropout!r}")
        if not (_is_number(self.eval_fraction) and 0 < self.eval_fraction < 1):
            out.append(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.method_options is not None and not isinstance(self.method_options, dict):
            out.append(f"method_options must be a mapping of option: value, got {self.method_options!r}")
        for name in ("model", "data", "out", "eval_data", "method"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                out.append(f"{name} must not be empty")
        if self.early_stopping is not None and self.eval_every is None:
            out.append("early_stopping counts evaluations during training: set eval_every too")
        named = {p.split(" ", 1)[0] for p in out}
        return out + [p for p in type_problems(self) if p.split(" ", 1)[0] not in named]

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems) + ".")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
# what other trainers call our keys: suggested when such a key appears in a config file
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "train_batch_size": "batch_size", "micro_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "output_dir": "out", "lr_scheduler_type": "schedule",
           "lr_scheduler": "schedule", "warmup_ratio": "warmup", "warmup_steps": "warmup",
           "max_seq_length": "max_length", "sequence_len": "max_length", "cutoff_len": "max_length",
           "model_name_or_path": "model", "base_model": "model", "dataset": "data", "datasets": "data",
           "eval_steps": "eval_every", "save_steps": "save_every", "peft_type": "method", "adapter": "method",
           "resume_from_checkpoint": "resume", "max_grad_norm": "max_grad_norm", "lora_r": "method_options"}
_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_EXPECTED = {"float": ((), "a number"), "int": ((int,), "an integer"), "bool": ((bool,), "true or false"),
             "str": ((str,), "a string"), "dict": ((dict, str), "a mapping of option: value (or k=v,...)")}


def _coerce(key: str, value: Any) -> Any:
    """`value` in the type field `key` declares. YAML gives ints for floats like ``1``, strings for
    ``1e-3`` (YAML 1.1) and numbers for names like ``2024``; those are converted. A value of
    another type (a list for a number, ...) is a ConfigError naming the key."""
    kind = str(_TYPES[key])
    base = kind.split("[")[0].split(" ")[0]  # "dict[str, Any] | None" -> "dict"
    types, what = _EXPECTED[base]
    if value is None:
        if kind.endswith("None"):
            return None
        raise ConfigError(f"{key} needs a value ({what}), got null")
    if kind.startswith("float") and isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int past the float range
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {shown(value)}")
        return number
    if kind.startswith("int") and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        try:
            return int(value)
        except ValueError:  # more digits than Python converts
            raise ConfigError(f"{key}={shown(value)} has more digits than an integer setting can use") from None
    if kind.startswith("str") and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a name YAML read as a number (out: 2024)
    if isinstance(value, types) and (base == "bool" or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {what}, got {shown(value)}")


def from_mapping(data: dict[str, Any], source: str, base: TrainConfig | None = None) -> TrainConfig:
    """`base` updated with `data` (keys may use dashes). Unknown keys raise with a suggestion; values
    of the wrong type are all reported at once."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of key: value, got {type(data).__name__}.")
    updates, problems = {}, []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in _TYPES:
            hint = f" Did you mean: {ALIASES[key]}?" if key in ALIASES else (did_you_mean(key, FIELDS) or " No close match.")
            raise ConfigError(f"{source}: unknown key {shown(raw_key)}.{hint} Keys: {', '.join(FIELDS)}.")
        try:
            updates[key] = _coerce(key, value)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems) + ".")
    if isinstance(updates.get("method_options"), str):
        updates["method_options"] = parse_options(updates["method_options"])
    return dataclasses.replace(base or TrainConfig(), **updates)


def load_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file onto `base`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    except (ValueError, OverflowError, RecursionError) as err:  # a constructor's own check: a date like 2001-13-45
        raise ConfigError(f"config file {path} holds a value YAML cannot read ({shown(str(err))}); quote it, or "
                          "fix it.") from None
    return from_mapping(data or {}, f"config file {path}", base)


def _split_top_level(text: str) -> list[str]:
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def split_top_level(text: str) -> list[str]:
    """The comma-separated pieces of `text`, commas inside brackets or quotes kept (``"r=8,t=[a,b]"``)."""
    return _split_top_level(text)


def parse_options(text: str) -> dict[str, Any]:
    """``"r=8,targets=[query,value],dropout=0.1"`` → ``{"r": 8, "targets": ["query", "value"], ...}``.

    Values are YAML scalars, lists or mappings (read with ``yaml.safe_load``: tags such as
    ``!!python/object`` are refused, never run); commas inside brackets do not split.

    Raises:
        ConfigError: a part that is not key=value, or a value YAML cannot read.
    """
    if not isinstance(text, str):
        raise ConfigError(f"method options must be text like r=8,alpha=16, got {shown(text)}.")
    out: dict[str, Any] = {}
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method option {shown(part)} is not key=value; write e.g. --method-options r=8,alpha=16.")
        if not value.strip():
            raise ConfigError(f"method option {key.strip()!r} has an empty value ({shown(part)}); give one, e.g. "
                              f"{key.strip()}=8, or leave the option out for its default.")
        out[key.strip().replace("-", "_")] = _yaml_value(key.strip(), value)
    return out


def _yaml_value(key: str, value: str) -> Any:
    try:
        parsed = yaml.safe_load(value)
    # besides YAMLError: a constructor's own check (a date like 2001-13-45, an int of 5000 digits),
    # and nesting deeper than Python's recursion limit
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        raise ConfigError(f"method option {key}={shown(value)}: the value is not valid YAML.") from None
    if _depth(parsed) > MAX_OPTION_DEPTH:
        raise ConfigError(f"method option {key}: the value nests more than {MAX_OPTION_DEPTH} levels (or refers to "
                          "itself through a YAML alias); write plain values and lists.")
    return parsed


def _depth(value: Any, limit: int = MAX_OPTION_DEPTH + 1) -> int:
    """Nesting depth of lists and mappings, counted up to `limit` (a structure that contains itself,
    through YAML's ``&a [*a]``, has no end)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if not children or limit == 0:
        return 0
    return 1 + max(_depth(v, limit - 1) for v in children)
