"""Adapter files: atomic writes, strict validation, and a model left untouched when a load is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import BUILDERS, batch, output_tensor, tiny_bert, tiny_llama

import peftkit
from peftkit.core.host import Host


def trained(model_name: str = "llama", **options) -> peftkit.TunedModel:
    tuned = peftkit.attach(BUILDERS[model_name](), peftkit.config("lora", r=4, **options))
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tuned


def snapshot(model: torch.nn.Module) -> tuple[dict, dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


def assert_untouched(model: torch.nn.Module, snap: tuple) -> None:
    state, flags, types = snap
    assert [type(m).__name__ for m in model.modules()] == types
    assert not any(isinstance(m, Host) for m in model.modules())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_files_and_metadata(tmp_path):
    tuned = trained()
    path = tuned.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["format"] == "peftkit" and meta["format_version"] == 1 and meta["method"] == "lora"
    assert meta["config"]["r"] == 4
    assert meta["base"]["architecture"] == "LlamaForCausalLM"
    assert set(meta["base"]["shapes"]) == set(tuned.sites("default"))
    assert len(meta["base"]["weights_sha256"]) == 64
    assert meta["files"]["adapter.safetensors"]["bytes"] == (tmp_path / "a" / "adapter.safetensors").stat().st_size
    assert path == str(tmp_path / "a")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_overwrite_replaces_atomically_and_refuses_foreign_folders(tmp_path):
    trained().save(tmp_path / "a")
    second = peftkit.attach(tiny_llama(), peftkit.config("lora", r=2))
    second.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["config"]["r"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(peftkit.errors.AdapterFileError, match="refusing to overwrite"):
        second.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    trained().save(tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    from peftkit.core.files import peftkit_format as io

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError):
        trained().save(tmp_path / "a")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def damage_truncate(folder):
    f = folder / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def damage_corrupt(folder):
    f = folder / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


def damage_version(folder):
    meta = json.loads((folder / "adapter.json").read_text())
    meta["format_version"] = 99
    (folder / "adapter.json").write_text(json.dumps(meta))


def damage_json(folder):
    (folder / "adapter.json").write_text("{ not json")


def damage_missing_weights(folder):
    (folder / "adapter.safetensors").unlink()


def damage_config(folder):
    meta = json.loads((folder / "adapter.json").read_text())
    meta["config"]["r"] = -1
    (folder / "adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,message", [
    (damage_truncate, "truncated"),
    (damage_corrupt, "corrupted"),
    (damage_version, "format version 99"),
    (damage_json, "not readable JSON"),
    (damage_missing_weights, "missing"),
    (damage_config, "invalid method config"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    trained().save(tmp_path / "a")
    damage(tmp_path / "a")
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(peftkit.errors.AdapterFileError, match=message):
        peftkit.load(model, tmp_path / "a")
    assert_untouched(model, snap)


def test_wrong_base_model_is_refused(tmp_path):
    trained().save(tmp_path / "a")
    other = tiny_bert()
    snap = snapshot(other)
    with pytest.raises(peftkit.errors.AdapterFileError, match="does not fit this model"):
        peftkit.load(other, tmp_path / "a")
    assert_untouched(other, snap)


def test_same_architecture_different_weights_is_refused(tmp_path):
    trained().save(tmp_path / "a")
    torch.manual_seed(123)
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    snap = snapshot(model)
    with pytest.raises(peftkit.errors.AdapterFileError, match="differs from the adapter's base"):
        peftkit.load(model, tmp_path / "a")
    assert_untouched(model, snap)
    tuned = peftkit.load(model, tmp_path / "a", check_base=False)
    assert tuned.adapters == ["default"]


def test_other_precision_of_the_same_base_loads_with_a_note(tmp_path):
    trained().save(tmp_path / "a")
    model = tiny_llama().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="statistically"):
        peftkit.load(model, tmp_path / "a")


def test_a_base_trained_in_lower_precision_matches_its_full_precision_original(tmp_path):
    """`--precision bf16` trains on the base cast to bfloat16: its adapter loads onto the float32 original
    silently (the same weights, cast), onto a bfloat16 copy too; other weights still get the note."""
    base = tiny_llama().to(torch.bfloat16)
    tuned = peftkit.attach(base, peftkit.config("lora", targets="all-linear"))
    tuned.save(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.load(tiny_llama(), tmp_path / "a")
        peftkit.load(tiny_llama().to(torch.bfloat16), tmp_path / "a")
    other = tiny_llama()
    with torch.no_grad():
        next(iter(other.model.layers[0].self_attn.q_proj.parameters())).add_(1e-4)
    with pytest.warns(UserWarning, match="statistically"):  # a nudged weight is not the same base, cast or not
        peftkit.load(other, tmp_path / "a")


def test_missing_extra_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    trained().save(tmp_path / "a")
    path = tmp_path / "a" / "adapter.safetensors"
    state = load_file(str(path))
    key = next(iter(state))
    variants = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "model.layers.0.mlp.up_proj.lora.A": torch.zeros(4, 32)},
        "shape mismatch": {**state, key: torch.zeros(3, 3)},
    }
    for message, tensors in variants.items():
        save_file(tensors, str(path))
        meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
        meta["files"] = {}  # skip the checksum so the tensor check itself is exercised
        (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
        model = tiny_llama()
        snap = snapshot(model)
        with pytest.raises(peftkit.errors.AdapterFileError, match=message):
            peftkit.load(model, tmp_path / "a")
        assert_untouched(model, snap)


def test_refused_load_onto_a_tuned_model_keeps_its_adapters(tmp_path):
    trained().save(tmp_path / "a")
    damage_corrupt(tmp_path / "a")
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", r=2), name="mine")
    inputs = batch("llama")
    with torch.no_grad():
        before = output_tensor(tuned(**inputs))
    flags = {k: p.requires_grad for k, p in tuned.named_parameters()}
    with pytest.raises(peftkit.errors.AdapterFileError):
        peftkit.load(tuned, tmp_path / "a")
    assert tuned.adapters == ["mine"] and tuned.active_adapters == ("mine",)
    assert {k: p.requires_grad for k, p in tuned.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(output_tensor(tuned(**inputs)), before)


def test_several_adapters_in_one_folder(tmp_path):
    tuned = trained()
    peftkit.attach(tuned, peftkit.config("lora", r=2, targets=["k_proj"]), name="other")
    with torch.no_grad():
        for p in tuned.trainable_parameters("other"):
            p.add_(0.1)
    tuned.save(tmp_path / "both")
    loaded = peftkit.load(tiny_llama(), tmp_path / "both")
    assert loaded.adapters == ["default", "other"]
    only = peftkit.load(tiny_llama(), tmp_path / "both", adapter="other")
    assert only.adapters == ["other"]
    inputs = batch("llama")
    for name in ("default", "other"):
        tuned.activate(name)
        loaded.activate(name)
        with torch.no_grad():
            assert torch.equal(output_tensor(tuned(**inputs)), output_tensor(loaded(**inputs)))


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(peftkit.errors.AdapterFileError, match="does not exist"):
        peftkit.load(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(peftkit.errors.AdapterFileError, match="holds no adapter"):
        peftkit.load(tiny_llama(), tmp_path / "empty")
    with pytest.raises(peftkit.errors.AdapterFileError, match="unknown format"):
        trained().save(tmp_path / "x", format="onnx")


def test_no_pickle_in_adapter_files(tmp_path):
    trained().save(tmp_path / "a")
    trained().save(tmp_path / "h", format="hf-peft")
    names = sorted(p.name for p in (tmp_path / "a").iterdir()) + sorted(p.name for p in (tmp_path / "h").iterdir())
    assert names == ["adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"]


def test_a_trained_head_loads_onto_any_freshly_loaded_base(tmp_path):
    """The README's flow: a classifier's adapter (its new task head saved whole) loads onto the user's
    own `from_pretrained(path, num_labels=2)`, whose head is freshly random each time — every time,
    with no warning, and computes what the trained model computed."""
    import warnings

    from support import save_tiny_bert
    from transformers import BertForSequenceClassification

    folder = save_tiny_bert(tmp_path / "encoder", head=False)
    torch.manual_seed(100)
    tuned = peftkit.attach(BertForSequenceClassification.from_pretrained(folder, num_labels=2), peftkit.config("lora"))
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tuned.save(tmp_path / "a")
    tuned.save(tmp_path / "hf", format="hf-peft")
    ids = torch.randint(5, 30, (3, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tuned.eval()
    expected = output_tensor(tuned(**inputs))
    for seed in range(20):
        torch.manual_seed(seed)  # a different random head every time
        for path in (tmp_path / "a", tmp_path / "hf"):
            fresh = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loaded = peftkit.load(fresh, path).eval()
            torch.testing.assert_close(output_tensor(loaded(**inputs)), expected, atol=1e-6, rtol=0)


def test_an_adapter_for_another_architecture_says_so(tmp_path):
    gpt2_prefix = peftkit.attach(BUILDERS["gpt2"](), peftkit.config("prefix_tuning", num_virtual_tokens=3))
    gpt2_prefix.save(tmp_path / "p")
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(peftkit.errors.BaseMismatchError, match=r"trained on a GPT2LMHeadModel \(gpt2\).*bert"):
        peftkit.load(model, tmp_path / "p")
    assert_untouched(model, snap)


@pytest.mark.parametrize("dtypes", [{"model.layers.0.self_attn.q_proj": {"weight": "torch.float64"}}, ["x"],
                                    {"model.layers.0.self_attn.q_proj": "bfloat16"}])
def test_a_tampered_dtype_record_is_ignored_not_a_crash(tmp_path, dtypes):
    peftkit.attach(tiny_llama().to(torch.bfloat16), peftkit.config("lora")).save(tmp_path / "a")
    meta_path = tmp_path / "a" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["dtypes"] = dtypes
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="statistically"):
        peftkit.load(tiny_llama(), tmp_path / "a")
