"""`benchmarks/end_to_end.py`'s fp8 table: each fp8 variant against its own settings without fp8."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

end_to_end = pytest.importorskip("benchmarks.end_to_end")


def test_every_fp8_variant_has_the_bf16_baseline_of_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert end_to_end.fp8_baseline("dsv3-fp8") == "dsv3-compile"
    assert end_to_end.fp8_baseline("dsv3-fp8-rowwise") == "dsv3-compile"
    assert end_to_end.fp8_baseline("dsv3-graphs-fp8") == "dsv3-graphs"  # graphed against graphed
    assert end_to_end.fp8_baseline("dsv3-graphs") is None
    for name in end_to_end.VARIANTS:  # raises for an fp8 variant added without its baseline
        end_to_end.fp8_baseline(name)
    # the settings compared are the variant's whole spec: a variant that spells out a default still matches
    variants = {
        **end_to_end.VARIANTS,
        "spelled": {"dsv3": True, "attn_pad_v": True, "compile": True, "float8": "rowwise"},
    }
    monkeypatch.setattr(end_to_end, "VARIANTS", variants)
    assert end_to_end.fp8_baseline("spelled") == "dsv3-compile"


def test_an_fp8_variant_without_a_baseline_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = {
        **end_to_end.VARIANTS,
        "orphan": {"attn_pad_v": True, "expert_impl": "loop", "float8": "tensorwise"},
    }
    monkeypatch.setattr(end_to_end, "VARIANTS", variants)
    with pytest.raises(ValueError, match="'orphan' has no bf16 baseline"):
        end_to_end.fp8_baseline("orphan")


def test_fp8_table_compares_each_variant_with_its_baseline() -> None:
    timer = lambda losses: SimpleNamespace(losses=losses)  # noqa: E731
    results = {
        "dsv3-compile": timer([4.0, 2.0]),
        "dsv3-graphs": timer([4.0, 1.0]),
        "dsv3-graphs-fp8": timer([4.0, 1.01]),
        "dsv3-fp8": timer([4.0, 2.1]),
    }
    step_s = {"dsv3-compile": 0.2, "dsv3-graphs": 0.1, "dsv3-graphs-fp8": 0.08, "dsv3-fp8": 0.3}
    text = end_to_end.fp8_against_baseline(results, step_s, window=1)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()[4:]  # after the blank lines, the header and its rule
    }
    assert rows["dsv3-graphs-fp8"][:2] == ["dsv3-graphs", "0.800"]
    assert rows["dsv3-graphs-fp8"][3] == "+1.00%"
    assert rows["dsv3-fp8"][:2] == ["dsv3-compile", "1.500"]
    # without its baseline in the run, an fp8 variant gets no row
    assert "dsv3-fp8" not in end_to_end.fp8_against_baseline({"dsv3-fp8": results["dsv3-fp8"]}, step_s, 1)
