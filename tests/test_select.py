"""Target selection shared by every method."""

from __future__ import annotations

import pytest
from models import tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit.core import arch
from peftkit.core.targets import head_names, layer_index, output_head_names, parse_layers, select


def test_suffix_exact_regex_type_and_exclude():
    model = tiny_llama()
    assert select(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select(model, "model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]
    assert select(model, [r"re:.*layers\.0\.self_attn\.[kv]_proj"]) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert len(select(model, "type:Linear")) == 2 * 7 + 1  # 7 per block + lm_head
    assert select(model, ["q_proj", "v_proj"], exclude=["re:.*layers\\.1\\..*"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_skips_output_and_task_heads():
    llama = select(tiny_llama(), "all-linear")
    assert len(llama) == 14 and "lm_head" not in llama
    bert = tiny_bert()
    names = select(bert, "all-linear")
    assert "classifier" not in names and "bert.pooler.dense" in names
    gpt2 = select(tiny_gpt2(), "all-linear")
    assert "lm_head" not in gpt2 and "transformer.h.0.attn.c_attn" in gpt2  # Conv1D counts as linear


def test_layer_ranges():
    model = tiny_llama()
    assert select(model, "q_proj", layers=1) == ["model.layers.1.self_attn.q_proj"]
    assert select(model, "q_proj", layers="0-1") == select(model, "q_proj")
    assert select(model, "q_proj", layers="-1:") == ["model.layers.1.self_attn.q_proj"]
    assert parse_layers("0-2,5", 8) == {0, 1, 2, 5}
    assert parse_layers([-1], 4) == {3}
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert layer_index("lm_head") is None


def test_no_match_names_closest_modules():
    with pytest.raises(peftkit.errors.TargetError, match="q_proj") as err:
        select(tiny_llama(), ["q_projj"])
    assert "Closest module names" in str(err.value)
    with pytest.raises(peftkit.errors.TargetError) as err:
        select(tiny_llama(), ["q_proj", "nothing_here", "vproj"])
    message = str(err.value)
    assert "nothing_here" in message and "vproj" in message and "v_proj" in message  # all problems at once
    with pytest.raises(peftkit.errors.TargetError, match="exclude"):
        select(tiny_llama(), ["q_proj"], exclude=["nope"])
    with pytest.raises(peftkit.errors.TargetError, match="out of range"):
        select(tiny_llama(), ["q_proj"], layers=[7])
    with pytest.raises(peftkit.errors.TargetError, match="select nothing"):
        select(tiny_llama(), ["lm_head"], layers=[0])
    with pytest.raises(peftkit.errors.TargetError, match="invalid regular expression"):
        select(tiny_llama(), ["re:(["])


def test_unsupported_module_types_are_explained():
    with pytest.raises(peftkit.errors.TargetError, match="cannot adapt"):
        peftkit.attach(tiny_llama(), peftkit.config("lora", targets=["self_attn"]))


def test_heads_and_roles():
    assert head_names(tiny_bert()) == ["classifier"]
    assert head_names(tiny_llama()) == [] and output_head_names(tiny_llama()) == ["lm_head"]
    roles = arch.blocks(tiny_bert())
    assert roles[0].attn_out == "bert.encoder.layer.0.attention.output.dense"
    assert roles[0].ffn_out == "bert.encoder.layer.0.output.dense"
    assert roles[0].ffn_in == ["bert.encoder.layer.0.intermediate.dense"]
    llama = arch.blocks(tiny_llama())[1]
    assert llama.query == ["model.layers.1.self_attn.q_proj"] and llama.attn_out.endswith("o_proj")
    assert llama.ffn == "model.layers.1.mlp" and llama.ffn_out.endswith("down_proj")
    gpt2 = arch.blocks(tiny_gpt2())[0]
    assert gpt2.fused_qkv == ["transformer.h.0.attn.c_attn"] and gpt2.ffn_out == "transformer.h.0.mlp.c_proj"


def test_selection_sees_through_existing_wrappers():
    tuned = peftkit.attach(tiny_llama(), peftkit.config("lora", targets=["q_proj"]))
    assert select(tuned.model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert not any("base_layer" in n or "deltas" in n for n in select(tuned.model, "all-linear"))
