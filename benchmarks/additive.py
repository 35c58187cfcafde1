"""Additive methods on the real all-MiniLM-L6-v2: training step time and training memory as ratios
to LoRA (r=8 on query/value), and to the `peft` package for (IA)³, prompt tuning and prefix tuning,
all measured in the same process.

    nice .venv/bin/python benchmarks/additive.py [--repeats 6] [--threads 2] [--batch 32x48]

Training memory = bytes autograd saves for backward in one step (exact, see `_common.py`) + the
trainable state (each trainable tensor, its gradient and AdamW's two moments: 4 × fp32); the frozen
base is shared by every method and left out. Step time: fwd + bwd + AdamW step, interleaved runs,
median. The peft twins use the same sites and sizes as peftkit's defaults. peft's own prefix-tuning
forward refuses BERT under transformers 5 (it looks for a `past_key_values` argument that is now
`cache`), so "peft prefix" runs what that forward does otherwise: peft's prefix encoder
(`get_prompt`) passed to the model as `cache=` with a widened mask — the cache route, against
peftkit's AttentionInterface route.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import interleaved_median, load_minilm, minilm_batch, saved_activation_bytes

import peftkit

OURS: dict[str, dict] = {
    "lora": {"method": "lora", "r": 8, "alpha": 16},
    "adapter (houlsby)": {"method": "adapter"},
    "adapter (pfeiffer)": {"method": "adapter", "placement": "pfeiffer"},
    "parallel_adapter": {"method": "parallel_adapter"},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 20},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 20},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 10, "reparam_hidden": 512},
}
TWINS = {"ia3": "peft ia3", "prompt_tuning": "peft prompt_tuning", "prefix_tuning": "peft prefix (cache route)"}


class Case:
    """A model, its trainable parameters and a loss function for one training step."""

    def __init__(self, model: torch.nn.Module, loss: Callable[[dict], torch.Tensor]) -> None:
        self.model, self.loss = model, loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.optimizer.step()


def ours(options: dict) -> Case:
    tuned = peftkit.attach(load_minilm(), peftkit.config(options)).train()
    return Case(tuned, lambda b: tuned(**b).loss)


def peft_twin(name: str) -> Case:
    import peft

    model = load_minilm()
    if name == "ia3":
        sites = peftkit.attach(load_minilm(), peftkit.config("ia3")).sites("default")
        ffn = [s for s in sites if s.endswith("output.dense") and ".attention." not in s]
        config = peft.IA3Config(task_type="SEQ_CLS", target_modules=sites, feedforward_modules=ffn)
    elif name == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20)
    else:
        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10, prefix_projection=True,
                                         encoder_hidden_size=512)
    wrapped = peft.get_peft_model(model, config).train()
    if name != "prefix_tuning":
        return Case(wrapped, lambda b: wrapped(**b).loss)

    def cache_route(b: dict) -> torch.Tensor:
        mask = b["attention_mask"]
        cache = wrapped.get_prompt(batch_size=mask.shape[0])
        wide = torch.cat([torch.ones(mask.shape[0], 10, dtype=mask.dtype), mask], dim=1)
        return wrapped.base_model(input_ids=b["input_ids"], attention_mask=wide, cache=cache, labels=b["labels"]).loss

    return Case(wrapped, cache_route)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", default="32x48", help="batch size x sequence length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, length = map(int, args.batch.split("x"))
    batch = minilm_batch(size, length)
    cases = {name: ours(options) for name, options in OURS.items()}
    cases.update({twin: peft_twin(name) for name, twin in TWINS.items()})
    seconds = interleaved_median({n: (lambda c=c: c.step(batch)) for n, c in cases.items()}, repeats=args.repeats)
    rows = {}
    for name, case in cases.items():
        trainable = sum(p.numel() for p in case.params)
        memory = saved_activation_bytes(lambda c=case: c.loss(batch)) + 16 * trainable
        rows[name] = (trainable, seconds[name], memory)
    base = rows["lora"]
    print(f"all-MiniLM-L6-v2 (22.7M), batch {size}x{length}, {args.threads} threads, median of {args.repeats} "
          "interleaved steps; trainable = while training (task head included)")
    print(f"{'method':28}{'trainable':>11}{'step s':>8}{'x LoRA':>8}{'train MB':>10}{'x LoRA':>8}{'x peft':>8}{'mem x peft':>11}")
    for name, (trainable, sec, mem) in rows.items():
        twin = rows.get(TWINS.get(name, ""))
        vs = f"{sec / twin[1]:>8.2f}{mem / twin[2]:>11.2f}" if twin else ""
        print(f"{name:28}{trainable:>11,}{sec:>8.3f}{sec / base[1]:>8.2f}{mem / 2**20:>10.1f}{mem / base[2]:>8.2f}{vs}")


if __name__ == "__main__":
    main()
