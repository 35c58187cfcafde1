"""(IA)³, prompt tuning, P-tuning and prefix tuning files exchanged with the real `peft` package.

Outputs are compared with PEFT's forward where PEFT runs correctly under transformers 5. Where it
does not — prefix tuning on BERT (PEFT looks for a ``past_key_values`` argument that transformers 5
renamed to ``cache`` and refuses to run) — the reference is what PEFT means to compute: the model
called with PEFT's own prefix cache (``get_prompt``) as ``cache=`` and a widened mask.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import BUILDERS, batch, output_tensor
from peft import (
    IA3Config,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

import peftkit

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
NVT = 4


def inputs_of(model_name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(model_name).items() if k != "labels"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


def peft_logits(model, inputs, model_name: str, virtual: int) -> torch.Tensor:
    """PEFT's forward, cut to the real tokens (PEFT keeps logits of virtual tokens for causal LMs)."""
    out = logits(model, inputs)
    return out[:, virtual:] if TASK[model_name] == "CAUSAL_LM" else out


def randomize(params, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def bert_prefix_reference(peft_model, inputs) -> torch.Tensor:
    """What PEFT's BERT prefix forward would compute: its prefix cache passed as ``cache=``."""
    base = peft_model.get_base_model()
    mask = inputs["attention_mask"]
    cache = peft_model.get_prompt(batch_size=mask.shape[0])
    wide = torch.cat([torch.ones(mask.shape[0], NVT, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return base(input_ids=inputs["input_ids"], attention_mask=wide, cache=cache).logits


PEFT_CONFIGS = {
    "ia3": lambda name: IA3Config(task_type=TASK[name]),
    "prompt_tuning": lambda name: PromptTuningConfig(task_type=TASK[name], num_virtual_tokens=NVT),
    "p_tuning": lambda name: PromptEncoderConfig(task_type=TASK[name], num_virtual_tokens=NVT, encoder_hidden_size=16),
    "prefix_tuning": lambda name: PrefixTuningConfig(task_type=TASK[name], num_virtual_tokens=NVT),
}
OURS = {
    "ia3": {},
    "prompt_tuning": {"num_virtual_tokens": NVT},
    "p_tuning": {"num_virtual_tokens": NVT, "encoder_hidden": 16},
    "prefix_tuning": {"num_virtual_tokens": NVT, "reparam_hidden": 16},
}
VIRTUAL = {"prompt_tuning": NVT, "p_tuning": NVT}  # methods whose PEFT logits include virtual positions
PEFT_TYPE = {"ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}
CASES = [(m, n) for m in PEFT_CONFIGS for n in ("llama", "gpt2", "bert")]
SHIFTING = ("prompt_tuning", "p_tuning", "prefix_tuning")  # methods with a shift_positions option


@pytest.mark.parametrize("method,model_name", CASES)
def test_peftkit_reads_peft(method, model_name, tmp_path):
    model = get_peft_model(BUILDERS[model_name](), PEFT_CONFIGS[method](model_name))
    randomize([p for p in model.parameters() if p.requires_grad], seed=2)
    model.eval()
    inputs = inputs_of(model_name)
    virtual = VIRTUAL.get(method, 0)
    if method == "prefix_tuning" and model_name == "bert":
        with pytest.raises(ValueError, match="past key values"):  # PEFT's own BERT prefix forward (transformers 5)
            logits(model, inputs)
        expected = bert_prefix_reference(model, inputs)
    else:
        expected = peft_logits(model, inputs, model_name, virtual)
    model.save_pretrained(tmp_path / "peft")
    tuned = peftkit.load(BUILDERS[model_name](), tmp_path / "peft")
    assert tuned.config_of("default").method == method
    torch.testing.assert_close(logits(tuned, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,model_name", CASES)
def test_peft_reads_peftkit(method, model_name, tmp_path):
    options = dict(OURS[method])
    if method in SHIFTING and model_name == "bert":
        options["shift_positions"] = True  # encoders default to unshifted positions, which PEFT cannot express
    tuned = peftkit.attach(BUILDERS[model_name](), peftkit.config(method, **options))
    randomize(tuned.trainable_parameters(), seed=1)
    inputs = inputs_of(model_name)
    expected = logits(tuned, inputs)
    tuned.save(tmp_path / "hf", format="hf-peft")
    written = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert written["peft_type"] == PEFT_TYPE[method] and written["task_type"] == TASK[model_name]
    loaded = PeftModel.from_pretrained(BUILDERS[model_name](), tmp_path / "hf").eval()
    if method == "prefix_tuning" and model_name == "bert":
        got = bert_prefix_reference(loaded, inputs)
    else:
        got = peft_logits(loaded, inputs, model_name, VIRTUAL.get(method, 0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ia3_merge_matches_peft(tmp_path):
    """Both libraries fold the same vectors into the same weights."""
    model = get_peft_model(BUILDERS["llama"](), IA3Config(task_type="CAUSAL_LM"))
    randomize([p for p in model.parameters() if p.requires_grad], seed=3)
    model.save_pretrained(tmp_path / "peft")
    theirs = model.merge_and_unload().state_dict()
    ours = peftkit.load(BUILDERS["llama"](), tmp_path / "peft").merge().state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_generate_from_peft_file_matches_peft_forward(method, tmp_path):
    """peft's own generate() is wrong under transformers 5 (it drops the prefix, or re-prepends the
    prompt at every step), so the reference is greedy decoding with peft's forward and no cache."""
    model = get_peft_model(BUILDERS["llama"](), PEFT_CONFIGS[method]("llama"))
    randomize([p for p in model.parameters() if p.requires_grad], seed=4, scale=1.0)
    model.eval().save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(5))
    expected = ids
    for _ in range(4):
        step = peft_logits(model, {"input_ids": expected, "attention_mask": torch.ones_like(expected)}, "llama",
                           VIRTUAL.get(method, 0))[:, -1].argmax(-1)
        expected = torch.cat([expected, step[:, None]], dim=1)
    tuned = peftkit.load(BUILDERS["llama"](), tmp_path / "peft")
    got = tuned.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", SHIFTING)
def test_unshifted_encoder_adapter_refuses_the_peft_format(method, tmp_path):
    """Real tokens kept at their own positions (prefix_tuning's and p_tuning's default on BERT): PEFT
    always shifts them, so writing the PEFT format is refused."""
    tuned = peftkit.attach(BUILDERS["bert"](), peftkit.config(method, **OURS[method], shift_positions=False))
    with pytest.raises(peftkit.errors.ConfigError, match="shift_positions=True"):
        tuned.save(tmp_path / "hf", format="hf-peft")
    assert not (tmp_path / "hf").exists()
    tuned.save(tmp_path / "ours")  # its own format keeps it
    assert peftkit.load(BUILDERS["bert"](), tmp_path / "ours").config_of("default").method == method
