"""The one io module (data_pipeline/files.py): atomic writes and JSONL records."""
import json
import math

import pytest

from data_pipeline.files import append_jsonl, atomic_write_json, atomic_write_text, is_tmp_name, read_jsonl


def test_jsonl_round_trip_skips_a_line_cut_short_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    assert read_jsonl(path) == []
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None, "name": "ü"}]
    for row in rows:
        append_jsonl(path, row)
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    assert read_jsonl(path) == rows
    assert [json.loads(x) for x in path.read_text().splitlines()[:2]] == rows  # one plain JSON object a line


def test_a_record_with_nan_is_refused_not_written_as_bare_nan(tmp_path):
    path = tmp_path / "m.jsonl"
    with pytest.raises(ValueError):
        append_jsonl(path, {"loss": math.nan})
    assert not path.exists() or path.read_text() == ""


def test_atomic_writes_replace_the_whole_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert not is_tmp_name(path.name)


def test_file_digest_matches_the_libraries_and_falls_back_to_reads_without_mmap(tmp_path, monkeypatch):
    import hashlib
    import mmap

    import xxhash

    from data_pipeline.files import file_digest

    data = bytes(range(256)) * 5000 + b"tail"
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    for window in (1 << 12, 1 << 26):
        assert file_digest(tmp_path / "f", "sha256", window) == hashlib.sha256(data).hexdigest()
        assert file_digest(tmp_path / "f", "xxh3_128", window) == xxhash.xxh3_128(data).hexdigest()
    assert file_digest(tmp_path / "empty", "xxh3_128") == xxhash.xxh3_128(b"").hexdigest()

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    assert file_digest(tmp_path / "f", "xxh3_128", 1 << 12) == xxhash.xxh3_128(data).hexdigest()
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        file_digest(tmp_path / "f", "md5")
