"""The int8-ls4 latent dtype (int8 mu, 4-bit log_sigma): against an independent float64 quantizer, shard
round trips, the loader, and hostile files (one clear error naming the file)."""
import json

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.errors import ShardError
from data_pipeline.latent_codec import dequantize_uint4, pack_nibbles, quantize_uint4, unpack_nibbles
from data_pipeline.loader import ShardLoader
from data_pipeline.manifest import load_manifest
from data_pipeline.shards import ShardReader, ShardSpec, ShardWriter, encode_rows, row_crcs
from tests.helpers.data import write_latent_dataset


def reference_uint4(x):
    """float64 quantize/dequantize: float16 offset = min, float16 step = (max - offset) / 15."""
    x = np.asarray(x, dtype=np.float64)
    offset = x.min(-1).astype(np.float16).astype(np.float64)[..., None]
    step = ((x.max(-1, keepdims=True) - offset) / 15).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint(np.divide(x - offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15)
    return q, offset + q * step, step


def reference_int8(x):
    x = np.asarray(x, dtype=np.float64)
    scale = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)), -127, 127)
    return q * scale


def log_sigmas(rng, shape):
    """Posterior log-sigmas as an AE makes them: a narrow band per vector, away from 0."""
    centre = rng.uniform(-3, 0, shape[:-1] + (1,))
    return (centre + rng.standard_normal(shape) * rng.uniform(0.01, 0.3, shape[:-1] + (1,))).astype(np.float32)


def test_uint4_matches_a_float64_reference_and_its_error_bound():
    rng = np.random.default_rng(0)
    x = log_sigmas(rng, (60, 9, 64))
    x[0, 0] = -1.25  # a constant vector: step 0, stored exactly by its offset
    x[0, 1] = 0.0
    q, offset, step = quantize_uint4(x)
    assert q.dtype == np.uint8 and q.max() <= 15 and offset.dtype == step.dtype == np.float16
    assert offset.shape == step.shape == (60, 9)
    y = dequantize_uint4(q, offset, step)
    ref_q, ref_y, ref_step = reference_uint4(x)
    differ = q != ref_q
    assert differ.mean() < 1e-3 and (np.abs(q.astype(int) - ref_q)[differ] <= 1).all()  # only rounding ties
    assert (np.abs(y - ref_y)[~differ] <= 1e-6 * np.maximum(1, np.abs(ref_y[~differ]))).all()
    bound = 0.5 * ref_step * 1.001 + np.abs(x).max(-1, keepdims=True) * 2 ** -11 + 1e-7  # + float16 offset rounding
    assert (np.abs(y - x) <= bound).all()
    assert (y[0, 0] == -1.25).all() and (y[0, 1] == 0).all()
    sigma_err = np.abs(np.exp(y) - np.exp(x)) / np.exp(x)
    assert sigma_err.max() < np.exp(0.5 * 0.3 * 10 / 15) - 1  # the band's width sets it, not |log_sigma|
    with pytest.raises(ValueError, match="float16"):
        quantize_uint4(np.array([[-1e5, 0.0]], dtype=np.float32))


def test_nibble_packing_round_trips_any_length():
    rng = np.random.default_rng(1)
    for m in (1, 2, 7, 64, 333):
        q = rng.integers(0, 16, (5, m)).astype(np.uint8)
        packed = pack_nibbles(q)
        assert packed.dtype == np.uint8 and packed.shape == (5, (m + 1) // 2)
        assert np.array_equal(unpack_nibbles(packed, m), q)
    assert np.array_equal(pack_nibbles(np.array([[1, 2, 15]], np.uint8)), np.array([[0x21, 0x0F]], np.uint8))


def write_shard(path, n=23, seq_chunks=3, d=5, rows_per_batch=4, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4096, (n, 4 * seq_chunks))
    mu = rng.standard_normal((n, seq_chunks, d)).astype(np.float32) * 2
    ls = log_sigmas(rng, (n, seq_chunks, d))
    spec = ShardSpec("latents", 4 * seq_chunks, "uint16", 4, d, "int8-ls4")
    with ShardWriter(path, spec, rows_per_batch=rows_per_batch) as w:
        w.add(ids[:10], mu[:10], ls[:10])
        w.add(ids[10:], mu[10:], ls[10:])
        return w.finish(), spec, ids, mu, ls


def test_int8_ls4_shard_round_trip_against_the_reference(tmp_path):
    info, spec, ids, mu, ls = write_shard(tmp_path / "lat.arrow")  # L·d = 15: an odd number of nibbles
    assert spec.row_bytes() == 12 * 2 + 4 + 15 + 3 * 2 + 8 + 2 * 3 * 2  # ids, crc, mu, scales, codes, offsets, steps
    with ShardReader(info.path, expected_bytes=info.bytes) as r:
        assert r.spec == spec and r.columns == ["ids", "mu", "log_sigma", "mu_scale", "log_sigma_offset",
                                                "log_sigma_scale"]
        stored = r.read_batch(0)
        assert sum(a[0].nbytes for a in stored.values()) + 4 == spec.row_bytes()
        rows = np.random.default_rng(3).permutation(23)
        got = r.read_samples(rows)
        empty = r.read_samples([])
    assert np.array_equal(got["ids"], ids[rows])
    assert got["mu"].dtype == got["log_sigma"].dtype == np.float32
    assert np.allclose(got["mu"], reference_int8(mu[rows]), rtol=1e-6, atol=1e-7)
    _, ref_ls, _ = reference_uint4(ls[rows])
    assert np.abs(got["log_sigma"] - ref_ls).max() <= np.abs(ref_ls).max() * 2 ** -10  # at most a rounding tie
    assert empty["mu"].shape == empty["log_sigma"].shape == (0, 3, 5)
    with pytest.raises(ValueError, match="non-finite"):
        encode_rows(spec, ids[:1], mu[:1], np.full_like(ls[:1], np.inf))


def test_int8_ls4_through_the_manifest_and_the_loader(tmp_path):
    rng = np.random.default_rng(4)
    m = write_latent_dataset(tmp_path / "lat", rng.integers(0, 4096, (12, 16)),
                             rng.standard_normal((12, 4, 8)).astype(np.float32),
                             log_sigmas(rng, (12, 4, 8)), latent_dtype="int8-ls4")
    assert load_manifest(tmp_path / "lat").latent["dtype"] == "int8-ls4"
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["latent"]["dtype"] == "int8-ls4"
    batch = next(iter(ShardLoader(tmp_path / "lat", global_batch_size=4)))
    assert batch["log_sigma"].shape == (4, 4, 8) and batch["log_sigma"].dtype.is_floating_point


def hostile_copy(src, dst, edit):
    """Rewrite a shard with `edit(stored arrays)` applied and fresh, matching CRCs (a file made elsewhere)."""
    with ShardReader(src) as r:
        spec, rows, stored = r.spec, r.rows_per_batch, r.read_batch(0)
    edit(stored)
    cols = list(stored)
    schema = spec.schema(rows)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(stored[c].reshape(-1)), stored[c].shape[1]) for c in cols]
        w.write_batch(pa.RecordBatch.from_arrays(arrays + [pa.array(row_crcs(stored, cols), pa.uint32())],
                                                 schema=schema))


def test_hostile_int8_ls4_files_give_one_error_naming_the_file(tmp_path):
    info, *_ = write_shard(tmp_path / "lat.arrow", n=4)

    def inf_step(s):
        s["log_sigma_scale"] = s["log_sigma_scale"].copy()
        s["log_sigma_scale"][2, 1] = np.inf

    hostile_copy(info.path, tmp_path / "inf.arrow", inf_step)
    with pytest.raises(ShardError, match=r"inf\.arrow: non-finite log_sigma_scale in sample 2"):
        ShardReader(tmp_path / "inf.arrow").read_samples([0])

    def nan_offset(s):
        s["log_sigma_offset"] = np.full_like(s["log_sigma_offset"], np.nan)

    hostile_copy(info.path, tmp_path / "nan.arrow", nan_offset)
    with pytest.raises(ShardError, match=r"nan\.arrow: non-finite log_sigma_offset"):
        ShardReader(tmp_path / "nan.arrow", num_samples=4).read_batch(0)

    # the 4-bit column one byte short of what the metadata says: the schema check names the file
    with ShardReader(info.path) as r:
        schema = r.spec.schema(4)
    short = pa.schema([pa.field("log_sigma", pa.list_(pa.uint8(), 7)) if f.name == "log_sigma" else f
                       for f in schema], metadata=schema.metadata)
    with pa.OSFile(str(tmp_path / "short.arrow"), "wb") as sink, pa.ipc.new_file(sink, short):
        pass
    with pytest.raises(ShardError, match=r"short\.arrow: columns do not match"):
        ShardReader(tmp_path / "short.arrow")

    data = info.path.read_bytes()  # a truncated file
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"cut\.arrow"):
        ShardReader(tmp_path / "cut.arrow")
