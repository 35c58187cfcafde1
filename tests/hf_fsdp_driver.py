"""Run by tests/test_train_hf_fsdp.py, alone or under torchrun: PeftkitTrainer (with a PeftkitCallback)
trains a tiny Llama with LoRA, under the Trainer's FSDP2 when there are several processes.

argv: the tiny model's folder, the output folder, the global batch size. Each process prints, after
training, a JSON line: its rank, whether FSDP was on, and how many adapter folders it wrote.

accelerate turns a Trainer's ``fsdp`` on only for GPU-like devices (``AcceleratorState.__init__`` in
accelerate/state.py keeps ``fsdp_plugin`` only when ``distributed_type`` is MULTI_GPU, MULTI_NPU, ...;
on CPU it is MULTI_CPU and FSDP is silently dropped: plain DDP). To run the GPU code path on CPU with
gloo, this driver makes that one decision as accelerate makes it on GPUs; everything else (FSDP2
``fully_shard`` per block, DTensor parameters, the Trainer's FSDP checkpoints) is accelerate's own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from test_train_hf import _lm_rows
from transformers import AutoModelForCausalLM, TrainingArguments

import peftkit
from peftkit.core import files
from peftkit.core.files import peftkit_format
from peftkit.train import PeftkitCallback, PeftkitTrainer


def fsdp_on_cpu() -> None:
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init


def count_writes() -> list[str]:
    """The folders this process writes adapters into (the callback's `files.save`, the trainer's `write`)."""
    written: list[str] = []
    save, write = files.save, peftkit_format.write

    def counted_save(tuned, path, **kwargs):
        written.append(str(path))
        return save(tuned, path, **kwargs)

    def counted_write(tuned, name, folder):
        written.append(str(folder))
        return write(tuned, name, folder)

    files.save, peftkit_format.write = counted_save, counted_write
    return written


def main() -> None:
    folder, out, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    sharding = {}
    if world > 1:
        fsdp_on_cpu()
        sharding = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=batch // world,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, logging_steps=100, report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             lr_scheduler_type="constant", warmup_steps=0, train_sampling_strategy="sequential",
                             **sharding)
    written = count_writes()
    torch.manual_seed(0)
    tuned = peftkit.attach(AutoModelForCausalLM.from_pretrained(folder), peftkit.config("lora", targets="all-linear"))
    trainer = PeftkitTrainer(model=tuned, args=args, train_dataset=_lm_rows(folder), callbacks=[PeftkitCallback()])
    trainer.train()
    assert trainer.is_fsdp_enabled == (world > 1)
    trainer.save_model(str(out / "final"))
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "fsdp": trainer.is_fsdp_enabled,
                      "written": written}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
