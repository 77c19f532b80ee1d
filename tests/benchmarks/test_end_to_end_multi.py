"""benchmarks/end_to_end_multi.py's options: variants with compile=1, and a baseline curve that must
come from the same training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.end_to_end_multi import curve_settings, load_baseline, parse_variant, same_batches


def test_compile_and_gc_are_options_of_every_variant() -> None:
    assert parse_variant("dsv3:pp=2,schedule=dualpipe,n_microbatches=8,compile=1") == (
        "dsv3",
        {"pp": 2, "schedule": "dualpipe", "n_microbatches": 8},
        True,
        0,
    )
    assert parse_variant("ddp:compile=1,gc=50") == ("ddp", {}, True, 50)
    assert parse_variant("dsv3:pp=2,gc=10") == ("dsv3", {"pp": 2}, False, 10)
    assert parse_variant("fsdp") == ("fsdp", {}, False, 0)
    assert parse_variant("dsv3:pp=2,compile=reduce-overhead") == ("dsv3", {"pp": 2}, "reduce-overhead", 0)
    with pytest.raises(ValueError, match="gc=N takes the steps"):
        parse_variant("dsv3:gc=-1")
    with pytest.raises(ValueError, match="takes no layout"):
        parse_variant("ddp:pp=2")
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("deepspeed")


def _args(**changes: object) -> argparse.Namespace:
    settings = {"preset": "debug", "seq_len": 32, "global_batch": 8, "steps": 3, "lr": 1e-3}
    return argparse.Namespace(**{**settings, **changes})


def test_a_baseline_of_other_batches_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    curve = {"losses": [7.0, 6.5, 6.0], "batches": [1, 2, 3]}
    saved = {"settings": curve_settings(_args()), "world": 1, "curves": {"dsv3": curve}}
    path.write_text(json.dumps(saved))
    assert load_baseline(str(path), _args()) == {"name": "dsv3 on 1 device(s)", **curve}
    with pytest.raises(ValueError, match="global_batch=8 \\(this run: 16\\)"):
        load_baseline(str(path), _args(global_batch=16))


def test_same_batches_names_the_first_step_that_differs() -> None:
    assert same_batches([1, 2, 3], [1, 2, 3]) == "yes"
    assert same_batches([1, 5, 6], [1, 2, 3]) == "no (first at step 2)"
