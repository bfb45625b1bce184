"""Crash-safe result files and work-directory claims."""

from __future__ import annotations

import json

import pytest

from transfer_tf import results


def test_append_and_read_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    for i in range(3):
        results.append_jsonl(path, {"i": i, "nan": float("nan")})
    records = results.read_jsonl(path)
    assert [r["i"] for r in records] == [0, 1, 2]
    assert records[0]["nan"] is None  # NaN is stored as null, valid JSON


def test_torn_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    results.append_jsonl(path, {"i": 0})
    with open(path, "a") as f:
        f.write('{"i": 1, "trunc')  # a killed writer
    assert results.read_jsonl(path) == [{"i": 0}]
    results.append_jsonl(path, {"i": 2})
    assert results.read_jsonl(path) == [{"i": 0}, {"i": 2}]
    assert path.read_text().count("\n") == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"i": 0}\nGARBAGE\n{"i": 2}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: corrupt JSON line"):
        results.read_jsonl(path)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "c.json"
    results.write_json(path, {"a": 1})
    results.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "model.npy"
    with results.atomic_path(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == target.parent
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), results.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["model.npy"]
    directory = tmp_path / "saved_model"
    for content in ("a", "b"):
        with results.atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / "saved_model.pb").write_text(content)
    assert (directory / "saved_model.pb").read_text() == "b"


def test_write_if_changed(tmp_path):
    path = tmp_path / "summary.md"
    assert results.write_if_changed(path, "x\n")
    stamp = path.stat().st_mtime_ns
    assert not results.write_if_changed(path, b"x\n")
    assert path.stat().st_mtime_ns == stamp
    assert results.write_if_changed(path, "y\n") and path.read_text() == "y\n"
