"""What the additive methods promise beyond the contract suite (tests/test_contract.py):
placements, near-identity init, exact forms, prefix / prompt semantics, generate(), errors."""

from __future__ import annotations

import pytest
import torch
from models import BUILDERS, PlainNet, batch, output_tensor
from transformers import DynamicCache

import peftkit
from peftkit.errors import ConfigError, TargetError


def inputs_of(name: str, **kw) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(name, **kw).items() if k != "labels"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


def perturb(tuned, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoding: a full forward per new token, no KV cache."""
    for _ in range(steps):
        nxt = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


# -- placements --------------------------------------------------------------------------------

PLACED = {
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
}


def _slot_sites(tuned, slot: str) -> list[str]:
    return [row.site for row in tuned.summary().rows if row.slot == slot]


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_default_placements(name):
    houlsby = peftkit.attach(BUILDERS[name](), peftkit.config("adapter"))
    assert _slot_sites(houlsby, "adapter") == [site.format(i) for i in range(2) for site in PLACED[name]]
    assert len(_slot_sites(houlsby, "norm")) == 4  # both normalisation layers of each block train (Houlsby)
    pfeiffer = peftkit.attach(BUILDERS[name](), peftkit.config("adapter", placement="pfeiffer"))
    assert _slot_sites(pfeiffer, "adapter") == [PLACED[name][1].format(i) for i in range(2)]
    assert not _slot_sites(pfeiffer, "norm")


def test_ia3_sites_and_shapes():
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config("ia3"))
    state = tuned.adapter_state("default")
    assert state["model.layers.0.self_attn.k_proj.ia3.scale"].shape == (16,)  # output: 2 kv heads x 8
    assert state["model.layers.0.mlp.down_proj.ia3.scale"].shape == (64,)  # input of the down projection
    assert len(state) == 6


def test_parallel_adapter_is_ffn_input_to_output():
    """On BERT the FFN is split over two modules; the adapter reads the intermediate's input."""
    model = BUILDERS["bert"]()
    tuned = peftkit.attach(model, peftkit.config("parallel_adapter", scale=2.0))
    perturb(tuned)
    layer = model.bert.encoder.layer[0]
    delta = layer.output.dense.deltas["default"]["parallel"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        with tuned.disabled():
            h = layer.intermediate(x)
            plain = layer.output.dense(h)
        got = layer.output.dense(layer.intermediate(x))
        assert torch.allclose(got, plain + 2.0 * delta.net(x), atol=1e-6)


def test_adapter_near_identity_at_init():
    for name in ("bert", "llama", "gpt2"):
        inputs = inputs_of(name)
        reference = logits(BUILDERS[name](), inputs)
        got = logits(peftkit.attach(BUILDERS[name](), peftkit.config("adapter")), inputs)
        assert 0 < (got - reference).abs().max() < 1e-3


def test_errors_name_the_option():
    with pytest.raises(ConfigError, match="placement"):
        peftkit.config("adapter", placement="middle")
    with pytest.raises(ConfigError, match="bottleneck or reduction_factor"):
        peftkit.config("parallel_adapter", bottleneck=8, reduction_factor=4)
    for method in ("adapter", "parallel_adapter", "ia3"):
        with pytest.raises(TargetError, match="targets"):
            peftkit.attach(PlainNet(), peftkit.config(method))
    with pytest.raises(TargetError, match="targets"):
        peftkit.attach(PlainNet(), peftkit.config("prefix_tuning"))
    with pytest.raises(ConfigError, match="init_text"):
        peftkit.config("prompt_tuning", init="text")
    with pytest.raises(ConfigError, match="layers"):
        peftkit.config("prefix_tuning", targets=["query"])


# -- prefix tuning -------------------------------------------------------------------------------

def _cache_route(tuned, name: str, inputs, shifted: bool = True) -> torch.Tensor:
    """The same prefix as a pre-filled cache (PEFT's route), real tokens at positions l, l+1, ...
    (or 0, 1, ... when not `shifted`)."""
    model = tuned.model
    rows = tuned.model_deltas["default"]["prefix"].rows()
    mask = inputs["attention_mask"]
    n = rows[0][0].shape[1]
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(rows):
        cache.update(k.unsqueeze(0).expand(mask.shape[0], -1, -1, -1), v.unsqueeze(0).expand(mask.shape[0], -1, -1, -1), i)
    wide = torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype), mask], dim=1)
    extra = {} if shifted else {"position_ids": torch.arange(mask.shape[1]).expand(mask.shape[0], -1)}
    with torch.no_grad():  # the bare model: site deltas (the task head copy) run, the prefix does not
        return output_tensor(model(input_ids=inputs["input_ids"], attention_mask=wide, cache=cache, **extra))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_prefix_equals_cache_route(name, implementation):
    model = BUILDERS[name]()
    model.config._attn_implementation = implementation
    tuned = peftkit.attach(model, peftkit.config("prefix_tuning", num_virtual_tokens=3, reparam_hidden=8,
                                                 shift_positions=True))
    perturb(tuned)
    inputs = inputs_of(name)  # row 0 is padded
    got = logits(tuned, inputs)
    assert model.config._attn_implementation == implementation  # the routing is undone after the call
    torch.testing.assert_close(got, _cache_route(tuned, name, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,shifted", [("bert", False), ("llama", True), ("gpt2", True)])
def test_prefix_shifts_positions_on_decoders_only(name, shifted):
    """By default decoders see the prefix as a pre-filled cache (positions l, l+1, ...); encoders keep
    their own positions, so BERT's [CLS] stays at position 0."""
    tuned = peftkit.attach(BUILDERS[name](), peftkit.config("prefix_tuning", num_virtual_tokens=3, reparam_hidden=8))
    assert tuned.model_deltas["default"]["prefix"].shift_positions is shifted
    perturb(tuned)
    inputs = inputs_of(name)
    torch.testing.assert_close(logits(tuned, inputs), _cache_route(tuned, name, inputs, shifted), atol=1e-5, rtol=1e-5)
    if shifted:  # and the other route really differs, so the check above can tell them apart
        assert not torch.allclose(logits(tuned, inputs), _cache_route(tuned, name, inputs, False), atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_generate_matches_uncached_decoding(name):
    tuned = peftkit.attach(BUILDERS[name](), peftkit.config("prefix_tuning", num_virtual_tokens=3))
    perturb(tuned, scale=0.5)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    out = tuned.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(tuned, ids, 5))
    with tuned.disabled():
        base = tuned.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, base)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_generate_left_padding(method):
    """A left-padded row generates what it generates alone."""
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config(method, num_virtual_tokens=3))
    perturb(tuned, scale=0.5)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    both = tuned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = tuned.generate(input_ids=ids[:1, 2:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert both.shape == (2, 10)
    assert torch.equal(both[0, 2:], alone[0])


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning"])
def test_generate_beams_and_dict_output(method):
    tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config(method, num_virtual_tokens=3))
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    beams = tuned.generate(input_ids=ids, max_new_tokens=3, num_beams=3, num_return_sequences=2, pad_token_id=0)
    assert beams.shape == (4, 8) and torch.equal(beams[::2, :5], ids)
    out = tuned.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2, 8) and len(out.scores) == 3


def test_prefix_gradient_checkpointing():
    """The backward recomputation sees the prefix too: same gradients with and without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        tuned = peftkit.attach(BUILDERS["llama"](), peftkit.config("prefix_tuning", num_virtual_tokens=3))
        if checkpointing:
            tuned.gradient_checkpointing_enable()
        tuned.train()
        tuned(**batch("llama")).loss.backward()
        grads.append([p.grad.clone() for p in tuned.trainable_parameters()])
        assert tuned.model.config._attn_implementation != "sdpa" or not checkpointing
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_prefix_saves_only_the_prefix(tmp_path):
    tuned = peftkit.attach(BUILDERS["gpt2"](), peftkit.config("prefix_tuning", num_virtual_tokens=4))
    trained = sum(p.numel() for p in tuned.trainable_parameters())
    state = tuned.adapter_state("default")
    assert list(state) == ["__model__.prefix.values"] and state["__model__.prefix.values"].shape == (4, 2 * 2 * 32)
    assert trained > state["__model__.prefix.values"].numel()  # the MLP trains but is not saved
    tuned.save(tmp_path / "a")
    loaded = peftkit.load(BUILDERS["gpt2"](), tmp_path / "a", trainable=True)
    assert [p.shape for p in loaded.trainable_parameters()] == [(4, 128)]


def _other_family(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    size = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    made = {
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=96, dim=32, hidden_dim=64, n_layers=2, n_heads=4)),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**size, pad_token_id=1)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**size, num_key_value_heads=2)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**size, num_key_value_heads=1, head_dim=16)),
    }[name]()
    return made.eval()


METHODS = ("adapter", "parallel_adapter", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")


@pytest.mark.parametrize("family", ["distilbert", "roberta", "qwen2", "gemma"])
def test_other_families_with_defaults(family):
    """Every method finds its placement on other architectures (DistilBERT takes no cache at all, so
    prefixes there exist only through the attention route; Gemma has head_dim != hidden / heads)."""
    inputs = inputs_of("bert")
    inputs["input_ids"] = inputs["input_ids"].clamp(min=3)
    reference = logits(_other_family(family), inputs)
    for method in METHODS:
        tuned = peftkit.attach(_other_family(family), peftkit.config(method))
        perturb(tuned, scale=0.1)
        assert not torch.allclose(logits(tuned, inputs), reference), method
        with tuned.disabled():
            assert torch.equal(logits(tuned, inputs), reference), method


# -- prompt tuning / p-tuning --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_virtual_tokens_forward(method, name):
    tuned = peftkit.attach(BUILDERS[name](), peftkit.config(method, num_virtual_tokens=3))
    data = batch(name)
    prompt = tuned.model_deltas["default"]["prompt"].table().detach()
    embeds = tuned.model.get_input_embeddings()(data["input_ids"])
    wide = torch.cat([prompt.expand(3, -1, -1), embeds], dim=1)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), data["attention_mask"]], dim=1)
    labels = data["labels"] if name == "bert" else torch.cat([torch.full((3, 3), -100), data["labels"]], dim=1)
    # p_tuning on the encoder keeps the real tokens' positions ([CLS] at 0); otherwise they follow the prompt
    length = data["input_ids"].shape[1]
    unshifted = name == "bert" and method == "p_tuning"
    positions = {} if not unshifted else {
        "position_ids": torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(length)]).expand(3, -1)}
    with torch.no_grad():
        out = tuned(**data)
        with tuned.disabled():
            manual = tuned.model(inputs_embeds=wide, attention_mask=mask, labels=labels, **positions)
            shifted = tuned.model(inputs_embeds=wide, attention_mask=mask, labels=labels)
    if unshifted:
        assert not torch.allclose(manual.logits, shifted.logits, rtol=1e-2, atol=0)  # the check can tell them apart
    expected = manual.logits if name == "bert" else manual.logits[:, 3:]
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, manual.loss)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_generate_injects_once(method):
    tuned = peftkit.attach(BUILDERS["gpt2"](), peftkit.config(method, num_virtual_tokens=3))
    perturb(tuned, scale=0.5)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(2))
    out = tuned.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, greedy_without_cache(tuned, ids, 5))


def test_prompt_tuning_inits(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "tok")
    model = BUILDERS["llama"]()
    embed = model.get_input_embeddings()
    text = peftkit.attach(model, peftkit.config("prompt_tuning", num_virtual_tokens=4, init="text",
                                                init_text="w5 w6 w7", tokenizer=str(tmp_path / "tok")))
    values = text.model_deltas["default"]["prompt"].table().detach()
    torch.testing.assert_close(values, embed(torch.tensor([5, 6, 7, 5])).detach())
    rows = peftkit.attach(BUILDERS["llama"](), peftkit.config("prompt_tuning", num_virtual_tokens=4))
    values = rows.model_deltas["default"]["prompt"].table().detach()
    assert all((embed.weight == row).all(dim=1).any() for row in values)  # rows of the vocabulary
