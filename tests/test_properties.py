"""Bad input never crashes and never misleads (issue 17): property tests over method options, target
specs, ``--method-options`` strings and data files. Whatever goes in, the only exception that comes
out is a `PeftkitError`, and a refused attach leaves the model bit-identical.

Derandomized, so every run tries the same examples; ``--hypothesis-show-statistics`` prints how
many each property ran and how many reached each stage (``event`` lines).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
from functools import cache
from typing import Any

import pytest
import torch
import yaml
from garbage import (
    CELL_VALUES,
    FIELD_NAMES,
    LABELS,
    Fingerprint,
    garbage,
    layer_specs,
    option_strings,
    options_for,
    records,
    spec_entry,
    target_specs,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from models import tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit.core import registry
from peftkit.core.targets import parse_layers, select
from peftkit.errors import ConfigError, PeftkitError
from peftkit.train import files
from peftkit.train.config import FIELDS, from_mapping, parse_options
from peftkit.train.data import LABEL_FIELDS, TEXT_FIELDS, Source, fill_fields, label_ids, load_source

METHODS = peftkit.methods()
MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def fixed(examples: int) -> settings:
    """The same `examples` inputs on every run and machine; no time limit per example."""
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


@cache
def pristine(kind: str) -> tuple[torch.nn.Module, Fingerprint]:
    model = MODELS[kind]()
    return model, Fingerprint.of(model)


def fresh(kind: str) -> tuple[torch.nn.Module, Fingerprint]:
    model, print_ = pristine(kind)
    return copy.deepcopy(model), print_


def attach_or_refuse(kind: str, config: Any) -> None:
    """Attach `config`; a refusal must be a PeftkitError and leave the model exactly as it was."""
    model, before = fresh(kind)
    try:
        peftkit.attach(model, config)
    except PeftkitError:
        event("attach refused")
        changed = before.differences(model)
        assert not changed, f"refused attach of {config!r} on {kind} changed the model: {changed}"
    else:
        event("attach succeeded")


# -- method options ------------------------------------------------------------------------------------
@fixed(400)
@given(data=st.data(), method=st.sampled_from(METHODS))
def test_any_options_give_a_config_or_a_config_error(data, method) -> None:
    options = data.draw(options_for(method))
    try:
        peftkit.config(method, **options)
    except PeftkitError as err:
        event("refused")
        assert isinstance(err, ConfigError)
    else:
        event("valid")


@fixed(200)
@given(data=st.data(), method=st.sampled_from(METHODS))
def test_a_refused_option_is_named_in_the_message(data, method) -> None:
    try:
        peftkit.config(method)
    except ConfigError:
        return  # the defaults alone are refused (e.g. adalora needs total_steps): nothing to single out
    name = data.draw(st.sampled_from(registry.get(method).config_cls.option_names()) | st.text(min_size=1))
    value = data.draw(options_for(method, max_size=1, unknown=False).map(lambda o: next(iter(o.values()), None)))
    try:
        peftkit.config(method, **{name: value})
    except ConfigError as err:
        event("refused")
        assert repr(name)[1:-1] in str(err), f"{method}: {name}={value!r} was refused without naming it: {err}"


# options without which a method's config is always refused (so that drawn options reach attach)
NEEDED = {"adalora": {"total_steps": 100}, "compose": {"parts": [{"method": "lora"}, {"method": "ia3"}]}}


@pytest.mark.parametrize("method", METHODS)
@fixed(20)
@given(data=st.data(), kind=st.sampled_from(sorted(MODELS)))
def test_a_valid_config_attaches_or_is_refused_cleanly(method, data, kind) -> None:
    options = {**NEEDED.get(method, {}), **data.draw(options_for(method, max_size=3, unknown=False))}
    try:
        config = peftkit.config(method, **options)
    except ConfigError:
        event("config refused")
        return
    attach_or_refuse(kind, config)


def test_values_too_long_to_print_are_refused_cleanly() -> None:
    """An int past Python's 4300-digit str limit cannot be repr()'d (so not drawn by hypothesis,
    which prints what it draws); messages must still come out."""
    huge = 10**5000
    for method, options in [("lora", {"r": huge}), ("lora", {"alpha": huge}),
                            ("lora", {"rank_pattern": {"query": huge}}), ("adapter", {"reduction_factor": huge}),
                            ("sparse_adapter", {"seed": huge}), ("qlora", {"blocksize": huge})]:
        with pytest.raises(ConfigError, match="too large to show"):
            peftkit.config(method, **options)
    with pytest.raises(PeftkitError, match="out of range"):
        peftkit.attach(tiny_llama(), peftkit.config("lora", layers=huge))
    with pytest.raises(ConfigError, match="too large to show"):
        from_mapping({"epochs": huge}, "test")


@pytest.mark.parametrize("method, options", [
    ("qlora", {"targets": "query"}),  # quantizes the base, then finds no target
    ("qlora", {"trainable_modules": ["model"]}),  # a trainable module around the adapter's own sites
    ("compose", {"parts": [{"method": "qlora"}, {"method": "lora", "targets": "nope"}]}),
    ("sparse_adapter", {"base": "qlora", "base_options": {"targets": "nope"}}),
])
def test_a_refused_attach_puts_a_quantized_base_back(method, options) -> None:
    model, before = fresh("llama")
    with pytest.raises(PeftkitError):
        peftkit.attach(model, peftkit.config(method, **options))
    assert not before.differences(model)


# -- target specs -----------------------------------------------------------------------------------------
SPEC_OPTIONS = ("targets", "exclude", "layers")
SITE_METHODS = [m for m in METHODS if set(SPEC_OPTIONS) & set(registry.get(m).config_cls.option_names())]


@fixed(200)
@given(method=st.sampled_from(SITE_METHODS), kind=st.sampled_from(sorted(MODELS)), targets=target_specs,
       exclude=target_specs, layers=layer_specs, keys=st.sets(st.sampled_from(SPEC_OPTIONS), min_size=1))
def test_target_specs_select_or_refuse_cleanly(method, kind, targets, exclude, layers, keys) -> None:
    names = set(registry.get(method).config_cls.option_names())
    options = {k: v for k, v in {"targets": targets, "exclude": exclude, "layers": layers}.items()
               if k in keys and k in names}
    try:
        config = peftkit.config(method, **NEEDED.get(method, {}), **options)
    except ConfigError:
        event("config refused")
        return
    attach_or_refuse(kind, config)


def half_none(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.booleans().flatmap(lambda none: st.none() if none else strategy)


@fixed(300)
@given(kind=st.sampled_from(sorted(MODELS)), targets=st.one_of(spec_entry, st.lists(spec_entry, max_size=3), garbage),
       exclude=half_none(target_specs), layers=half_none(layer_specs))
def test_select_takes_any_spec(kind, targets, exclude, layers) -> None:
    model, _ = pristine(kind)
    try:
        sites = select(model, targets, exclude=exclude, layers=layers)
    except PeftkitError:
        event("refused")
    else:
        event("selected")
        assert sites and all(isinstance(s, str) for s in sites)


@fixed(300)
@given(spec=layer_specs, total=st.integers(0, 5))
def test_layer_specs_parse_or_refuse(spec, total) -> None:
    try:
        layers = parse_layers(spec, total)
    except PeftkitError:
        return
    assert layers is None or all(isinstance(i, int) and 0 <= i < total for i in layers)


# -- --method-options strings -------------------------------------------------------------------------
@fixed(300)
@given(text=option_strings, method=st.sampled_from(METHODS))
def test_method_option_strings_parse_or_refuse(text, method) -> None:
    try:
        options = parse_options(text)
    except ConfigError:
        event("parse refused")
        return
    assert isinstance(options, dict) and all(isinstance(k, str) for k in options)
    try:
        peftkit.config(method, **options)
    except PeftkitError:
        event("config refused")


@fixed(300)
@given(data=st.dictionaries(st.sampled_from(FIELDS), st.one_of(garbage, option_strings), max_size=4))
def test_run_settings_of_any_type_give_a_config_or_a_config_error(data) -> None:
    try:
        from_mapping(data, "test").validate()
    except ConfigError:
        event("refused")
    else:
        event("valid")


def test_method_options_never_run_yaml_tags(monkeypatch) -> None:
    ran = []
    monkeypatch.setattr("os.system", lambda *a: ran.append(a))
    for text in ["x=!!python/object/apply:os.system ['true']", "x=!!python/name:os.system",
                 "x=!!python/object/new:os.system ['true']"]:
        with pytest.raises(ConfigError, match="not valid YAML"):
            parse_options(text)
    assert not ran
    loaders = []
    real_load = yaml.load

    def spy(stream, Loader):  # noqa: N803 (yaml's own argument name)
        loaders.append(Loader)
        return real_load(stream, Loader)

    monkeypatch.setattr(yaml, "load", spy)
    assert parse_options("r=8,targets=[query,value]") == {"r": 8, "targets": ["query", "value"]}
    safe = (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert loaders and all(issubclass(loader, safe) for loader in loaders), "parse_options must use safe_load"


# -- data files ---------------------------------------------------------------------------------------------
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]
NASTY_JSON = ["[" * 100_000, "{\"a\":" * 50_000, "[" + "9" * 5000 + "]", '{"text": 1e999}', "[NaN, Infinity]",
              '[{"text": "\\ud800"}]', '{"a": 1}\n[1]', "\x00", '[{"text": "a"}, 1]', "[]", "{}", "null"]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["text"]
    writer = csv.DictWriter(out, fieldnames=names)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _json_lines(rows: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r, default=repr) for r in rows)


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".txt"]))
    how = draw(st.sampled_from(["records", "records", "records", "bytes", "nasty"]))
    if how == "bytes":
        return suffix, draw(st.binary(max_size=200))
    if how == "nasty":
        return suffix, draw(st.sampled_from(NASTY_JSON)).encode("utf-8", "surrogatepass")
    rows = draw(records)
    text = {".csv": _csv_text, ".tsv": _csv_text, ".jsonl": _json_lines,
            ".json": lambda r: json.dumps(r, default=repr), ".txt": _json_lines}[suffix](rows)
    text = draw(st.sampled_from(["", "\ufeff", "\x00", "\n\n"])) + text
    encoding = draw(st.sampled_from(ENCODINGS))
    return suffix, text.encode(encoding, "surrogatepass" if encoding.startswith("utf-8") else "replace")


def resolve(path: str) -> None:
    """Everything a run does with a data file before tokenising: read it, pick fields, read labels."""
    recs = files.read_records(path)
    src = load_source(path, {"text": None, "label": None})
    for task in ("classification", "instruction", "lm"):
        try:
            fill_fields(Source(src.name, None, recs, {}, None), task)
        except PeftkitError:
            event(f"{task}: fields refused")
    for role, candidates in (("text", TEXT_FIELDS), ("label", LABEL_FIELDS)):
        for given_name in [None, *FIELD_NAMES[:3]]:
            with contextlib.suppress(PeftkitError):
                files.pick_field(recs, path, role, given_name, candidates)
    column = next((c for c in LABEL_FIELDS if all(c in r for r in recs)), None)
    if column is not None:
        values = [r[column] for r in recs]
        ids, names = label_ids(values, path)
        assert len(ids) == len(values) and all(isinstance(i, int) and i >= 0 for i in ids)
        label_ids(values, path, names or ["0", "1"])
        event("labels read")


@fixed(300)
@given(file=data_files())
def test_data_files_read_or_refuse(tmp_path_factory, file) -> None:
    suffix, content = file
    path = tmp_path_factory.getbasetemp() / f"data{suffix}"
    path.write_bytes(content)
    try:
        resolve(str(path))
    except PeftkitError:
        event("refused")


@fixed(200)
@given(values=st.lists(st.one_of(LABELS, st.sampled_from(CELL_VALUES), garbage), min_size=1, max_size=5),
       names=half_none(st.lists(st.sampled_from(["0", "1", "pos", "neg", "", "1.0"]) | st.text(max_size=3),
                                min_size=1, max_size=3, unique=True)))
def test_labels_become_ids_or_a_data_error(values, names) -> None:
    try:
        ids, out_names = label_ids(values, "data.csv", names)
    except PeftkitError:
        event("refused")
        return
    event("read")
    assert len(ids) == len(values) and all(type(i) is int and i >= 0 for i in ids)
    if out_names is not None:
        assert all(i < len(out_names) for i in ids)


@fixed(150)
@given(spec=st.one_of(st.text(max_size=30), st.sampled_from(["\x00", "a\x00.csv", "x" * 5000 + ".csv", "/" * 3,
                                                             ".", "~", "nope.csv", "a" * 300])))
def test_data_names_load_or_refuse(spec) -> None:
    try:
        load_source(spec, {"text": None})
    except PeftkitError:
        event("refused")
