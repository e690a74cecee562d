"""The shard format: round trips, latent storage precision, atomic writes, damage detection."""
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.errors import ManifestError, ShardError
from data_pipeline.inspection import verify
from data_pipeline.loader import ShardLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.shards import (
    ShardReader,
    ShardSpec,
    ShardWriter,
    bf16_bits_to_f32,
    dequantize_int8,
    f32_to_bf16_bits,
    quantize_int8,
    verify_shard,
)
from tests.helpers.data import write_token_dataset


def test_token_shard_round_trip_and_random_access(tmp_path):
    rng = np.random.default_rng(0)
    for vocab, dtype in ((4096, "uint16"), (128257, "int32")):
        ids = rng.integers(0, vocab, (300, 64))
        spec = ShardSpec("tokens", 64, dtype, 4)
        with ShardWriter(tmp_path / f"{dtype}.arrow", spec, rows_per_batch=32) as w:
            w.add(ids[:100])
            w.add(ids[100:])
            info = w.finish()
        assert info.num_samples == 300 and not list(tmp_path.glob(".*"))  # no temporary left
        with ShardReader(info.path, expected_bytes=info.bytes) as r:
            assert r.num_samples == 300 and r.num_batches == 10 and r.spec == spec
            rows = rng.permutation(300)[:40]
            got = r.read_samples(rows)["ids"]
            assert got.dtype == np.int64 and np.array_equal(got, ids[rows])


def test_bf16_matches_torch_rounding():
    x = np.concatenate([np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 10,
                        np.array([0.0, -0.0, 1e-40, 3.4e38, 1.00390625, 1.01171875], dtype=np.float32)])
    ours = f32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)  # round to nearest, ties to even, like torch
    back = bf16_bits_to_f32(ours)
    assert np.array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_int8_per_vector_quantization_error_bound():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 7, 128)).astype(np.float32) * rng.uniform(0.01, 10, (50, 7, 1)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero vector
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (50, 7)
    y = dequantize_int8(q, s)
    step = np.abs(x).max(-1, keepdims=True) / 127.0
    assert (np.abs(y - x) <= 0.5 * step * 1.01 + 1e-7).all()
    assert (y[0, 0] == 0).all()


def test_latent_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 4096, (20, 16))
    mu = rng.standard_normal((20, 4, 8)).astype(np.float32)
    ls = rng.standard_normal((20, 4, 8)).astype(np.float32) - 2
    for dtype in ("bf16", "int8"):
        spec = ShardSpec("latents", 16, "uint16", 4, 8, dtype)
        with ShardWriter(tmp_path / f"{dtype}.arrow", spec, rows_per_batch=3) as w:
            w.add(ids, mu, ls)
            info = w.finish()
        with ShardReader(info.path) as r:
            got = r.read_samples(np.arange(20)[::-1])
        assert np.array_equal(got["ids"], ids[::-1])
        tol = 2 ** -8 if dtype == "bf16" else 1 / 127
        for name, ref in (("mu", mu), ("log_sigma", ls)):
            err = np.abs(got[name] - ref[::-1]) / np.abs(ref[::-1]).max(-1, keepdims=True)
            assert got[name].dtype == np.float32 and err.max() <= tol


def test_writer_aborts_cleanly_and_checks_input(tmp_path):
    spec = ShardSpec("tokens", 8, "uint16", 4)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x.arrow", spec) as w:
            w.add(np.zeros((3, 8), dtype=np.int64))
            raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary
    with ShardWriter(tmp_path / "y.arrow", spec) as w:
        with pytest.raises(ValueError, match="outside"):
            w.add(np.full((2, 8), 70000))
        with pytest.raises(ValueError, match=r"\[n, 8\]"):
            w.add(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="non-finite"):
        with ShardWriter(tmp_path / "z.arrow", ShardSpec("latents", 8, "uint16", 4, 2, "bf16")) as w:
            w.add(np.zeros((1, 8)), np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(4)
    samples = rng.integers(0, 4096, (120, 32))
    m = write_token_dataset(tmp_path / "d", samples, shards=2, rows_per_batch=16)
    return m, samples


def read_all(path, n):
    with ShardReader(path) as r:
        return r.read_samples(np.arange(r.num_samples))["ids"] if r.num_samples == n else None


def test_truncated_shard_is_an_error_naming_it(dataset, tmp_path):
    m, _ = dataset
    path = m.shard_path(m.shards[1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="tokens-00001.arrow"):
        ShardReader(path)
    with pytest.raises(ShardError, match="tokens-00001.arrow.*truncated"):
        ShardReader(path, expected_bytes=m.shards[1].bytes)
    with pytest.raises(ManifestError, match="tokens-00001.arrow"):
        ShardLoader(m.path.parent, global_batch_size=4)
    assert verify(str(m.path.parent)) == ["tokens-00001.arrow"]


def test_verify_into_a_log_file_writes_whole_lines_only(dataset, tmp_path):
    import subprocess
    import sys

    m, _ = dataset
    log = tmp_path / "verify.log"
    with log.open("w") as f:  # stdout and stderr into one file, as a batch job's log is
        subprocess.run([sys.executable, "-c", f"from data_pipeline.inspection import verify; verify({str(m.path.parent)!r})"],
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    assert "\r" not in text and "ok      tokens-00000.arrow" in text
    assert all(line.startswith(("verifying", "  ok", "  DAMAGED", "0 damaged")) for line in text.splitlines()), text


def test_bit_flips_never_give_a_silent_wrong_sample(dataset):
    """Flip one bit at each of many places: reading either fails with ShardError or returns the
    original samples exactly (a flip in padding or unused metadata)."""
    m, samples = dataset
    path = m.shard_path(m.shards[0])
    original = path.read_bytes()
    n = m.shards[0].num_samples
    expect = samples[:n]
    errors = same = 0
    for pos in list(range(0, len(original), max(1, len(original) // 300))) + [len(original) - 1]:
        flipped = bytearray(original)
        flipped[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(flipped))
        try:
            got = read_all(path, n)
        except ShardError:
            errors += 1
            continue
        assert got is not None and np.array_equal(got, expect), f"silent damage from a flip at byte {pos}"
        same += 1
    path.write_bytes(original)
    assert errors > 0.5 * (errors + same)
    assert verify_shard(path, m.shards[0].bytes, m.shards[0].sha256, n) is None


def test_verify_reports_each_damaged_shard_by_name(dataset, capsys):
    m, _ = dataset
    p0 = m.shard_path(m.shards[0])
    data = bytearray(p0.read_bytes())
    data[len(data) // 3] ^= 0x01
    p0.write_bytes(bytes(data))
    p1 = m.shard_path(m.shards[1])
    p1.unlink()
    damaged = verify(str(m.path.parent))
    out = capsys.readouterr().out
    assert damaged == ["tokens-00000.arrow", "tokens-00001.arrow"]
    assert "DAMAGED tokens-00000.arrow: sha256 mismatch" in out and "DAMAGED tokens-00001.arrow: missing" in out


def test_manifest_listing_a_missing_file(dataset):
    m, _ = dataset
    m.shard_path(m.shards[1]).unlink()
    with pytest.raises(ManifestError, match=r"lists shard tokens-00001.arrow, which does not exist"):
        load_manifest(m.path)
    with pytest.raises(ManifestError, match="tokens-00001.arrow"):
        ShardLoader(m.path.parent, global_batch_size=4)


def test_incomplete_or_missing_manifest(tmp_path, dataset):
    m, _ = dataset
    d = m.path.parent
    shutil.copytree(d, tmp_path / "copy")
    (tmp_path / "copy" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="did not finish"):
        load_manifest(tmp_path / "copy")
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json"):
        load_manifest(tmp_path / "bad.json")
    assert verify(str(tmp_path / "copy")) == []  # verify works from the .done records
