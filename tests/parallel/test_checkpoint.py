"""Sharded checkpoints: saved on one mesh, loaded on another, the next step is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checks import checkpoint_run


def _union(results: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in results:
        out.update(r["state"])
    return out


@pytest.fixture(scope="module")
def saved(pool4, tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("ckpt") / "epoch1.ckpt"
    results = pool4.run(checkpoint_run, {"dp": 2, "ep": 2, "zero": True}, str(path), False)
    assert path.is_dir() and (path / "meta.pt").is_file()
    assert not path.with_name(path.name + ".tmp").exists()
    return path, results


@pytest.mark.parametrize(
    "layout",
    [
        {"ep": 4, "zero": False},
        {"dp": 4, "zero": True},
        {"pp": 2, "ep": 2, "schedule": "dualpipe", "zero": True},
        {"ep": 4, "schedule": "dualpipev", "zero": True},  # pp=1: two chunks on each rank
    ],
    ids=["ep4", "dp4-zero", "pp2xep2-dualpipe", "pp1xep4-dualpipev"],
)
def test_resume_on_another_mesh(pool4, saved, layout) -> None:
    path, uninterrupted = saved
    resumed = pool4.run(checkpoint_run, layout, str(path), True)
    for r in resumed:
        assert r["step"] == 3
        assert r["losses"] == pytest.approx(uninterrupted[0]["losses"][2:], rel=1e-5)
    expected, got = _union(uninterrupted), _union(resumed)
    assert got.keys() == expected.keys()
    for key, value in got.items():  # the step after loading used the restored optimizer state too
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_resume_in_one_process(pool1, saved) -> None:
    path, uninterrupted = saved
    (r,) = pool1.run(checkpoint_run, {"zero": True}, str(path), True)
    assert r["losses"] == pytest.approx(uninterrupted[0]["losses"][2:], rel=1e-5)
    for key, value in r["state"].items():
        torch.testing.assert_close(value, _union(uninterrupted)[key], rtol=1e-5, atol=1e-7, msg=key)


def test_one_rank_v_checkpoint_resumes_without_the_v(pool1, tmp_path) -> None:
    """Saved from pp=1 dualpipev's two chunks (both holding the embedding with MTP), loaded whole."""
    path = tmp_path / "v.ckpt"
    (uninterrupted,) = pool1.run(checkpoint_run, {"schedule": "dualpipev", "zero": True}, str(path), False)
    (r,) = pool1.run(checkpoint_run, {"zero": True}, str(path), True)
    assert r["losses"] == pytest.approx(uninterrupted["losses"][2:], rel=1e-5)
    assert r["state"].keys() == uninterrupted["state"].keys()
    for key, value in r["state"].items():
        torch.testing.assert_close(value, uninterrupted["state"][key], rtol=1e-5, atol=1e-7, msg=key)


def test_a_resume_reads_the_index_once(saved, monkeypatch) -> None:
    """Verification, the name and shape check and both dcp.loads of a resume share one read of DCP's
    index (a large checkpoint's `.metadata` is read by every rank)."""
    import torch.distributed.checkpoint as dcp

    from lightning_dsv3 import checkpoint as ckpt

    path, _ = saved
    reads: list[Path] = []
    read = dcp.FileSystemReader.read_metadata

    def counted(self, *args, **kwargs):
        reads.append(self.path)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(dcp.FileSystemReader, "read_metadata", counted)
    meta, reader = ckpt._verified(path)
    for _ in range(2):  # what each dcp.load of `load` does with the reader
        reader.reset()
        index = reader.read_metadata()
    assert len(reads) == 1
    assert meta["dsv3"]["format_version"] >= 1 and index.state_dict_metadata
