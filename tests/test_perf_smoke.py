"""benchmarks/perf.py --quick: every section runs end to end on tiny models and prints a ratio table
(a smoke test of the benchmark; its figures are measured by running it on the real models)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "perf.py"


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("perf_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_section(perf, tmp_path):
    # compile is left to tests/test_checkpointing_compile.py: inductor's first build dominates a smoke run
    sections = [s for s in perf.SECTIONS if s != "compile"]
    out = tmp_path / "perf.md"
    assert perf.main(["--quick", "--threads", "1", "--sections", *sections, "--out", str(out)]) == 0
    text = out.read_text()
    for section in sections:
        assert f"## {section}" in text
        table = text.split(f"## {section}")[1].split("\n## ")[0]
        if section == "precision" and "no native bfloat16" in table:
            continue  # a CPU without bf16 gets a row that says so, and no ratios
        ratios = [float(v) for v in re.findall(r"\| (\d+\.\d{3}) ", table)]
        assert ratios and all(r > 0 for r in ratios), section
    assert text.count("| minilm |") >= len(perf.RUNNERS) - 2  # causal rows come from smollm2 only


def test_quick_rebuild_comparison_prints_its_rows(capsys):
    """benchmarks/rebuild_ab.py --quick: a row per model and setting; with every linear layer adapted by LoRA,
    and with (IA)³, the rebuilt side keeps less, on both architectures."""
    spec = importlib.util.spec_from_file_location("rebuild_ab_benchmark", SCRIPT.parent / "rebuild_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--threads", "1", "--models", "minilm", "smollm2", "--methods", "lora", "ia3"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| minilm")
            or line.startswith("| smollm2")]
    assert len(rows) == 8
    for row in rows:
        memory_ratio = float(row[5])
        assert 0 < memory_ratio <= 1
        if row[1].startswith("lora all linear") or row[1] == "ia3":
            assert memory_ratio < 1
