"""The loader: deterministic order, exactly-once epochs at any DP world size, exact resume, blending."""
import json
import time
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError, ShardError
from data_pipeline.loader import ShardLoader, permute
from tests.helpers.data import write_token_dataset
from tests.helpers.ranks import launch_ranks

T = 8  # tokens per sample (L=2, K=4)


def identity_dataset(path, n, offset=0, shards=3, rows_per_batch=5):
    """Sample i holds the tokens offset+i, repeated: its identity can be read back from the batch."""
    samples = np.repeat((offset + np.arange(n))[:, None], T, axis=1)
    return write_token_dataset(path, samples, k=4, shards=shards, rows_per_batch=rows_per_batch)


def ids_of(batch):
    ids = batch["ids"]
    assert (ids == ids[:, :1]).all()
    return ids[:, 0].tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for key in (0, 1, 12345):
        p = permute(np.arange(n), n, key)
        assert sorted(p.tolist()) == list(range(n))
    if n >= 64:  # different keys give different orders
        assert not np.array_equal(permute(np.arange(n), n, 1), permute(np.arange(n), n, 2))


def consume(paths, world, steps, g=12, micro=None, seed=3, state=None, weights=None, prefetch=2):
    """Run `world` loaders (one per DP rank, in this process) for `steps` global batches; returns
    [global batch] → list of sample ids in global order, and the final state of rank 0."""
    loaders = [ShardLoader(paths, weights, global_batch_size=g, micro_batch_size=micro, dp_rank=r, dp_world_size=world,
                           seed=seed, prefetch=prefetch, return_index=True) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        batch = []
        for ld in loaders:
            for _ in range(ld.micro_steps):
                batch += ids_of(next(ld))
        out.append(batch)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)  # every rank holds the same state
    for ld in loaders:
        ld.close()
    return out, states[0]


def test_exactly_once_per_epoch_any_world_size(tmp_path):
    n = 50
    identity_dataset(tmp_path / "d", n)
    g = 12
    steps = (3 * n) // g + 1  # a bit more than 3 epochs; global batches straddle epoch ends
    runs = {w: consume(tmp_path / "d", w, steps, g=g, micro=(2 if w < 4 else 3))[0] for w in (1, 2, 4)}
    # global batch b holds the same samples, in the same order, whatever the world size
    assert runs[1] == runs[2] == runs[4]
    stream = [s for b in runs[1] for s in b]
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # a new order every epoch


def test_resume_mid_epoch_same_and_other_world_size(tmp_path):
    n = 50
    identity_dataset(tmp_path / "d", n)
    straight, _ = consume(tmp_path / "d", 2, 10)
    first, state = consume(tmp_path / "d", 2, 3)  # stop in the middle of epoch 0
    assert state["consumed_samples"] == 36 and state["epoch"] == 0
    for world in (1, 2, 4):
        rest, _ = consume(tmp_path / "d", world, 7, state=state)
        assert first + rest == straight
    # mid-global-batch (gradient accumulation) resume with the same world size
    ld = ShardLoader(tmp_path / "d", global_batch_size=12, micro_batch_size=2, dp_world_size=2, dp_rank=1, seed=3)
    seen = [ids_of(next(ld)) for _ in range(4)]
    mid = ld.state_dict()
    assert mid["micro_step"] == 1
    ld2 = ShardLoader(tmp_path / "d", global_batch_size=12, micro_batch_size=2, dp_world_size=2, dp_rank=1, seed=3)
    ld2.load_state_dict(mid)
    assert [ids_of(next(ld2)) for _ in range(3)] == [ids_of(next(ld)) for _ in range(3)]
    assert seen  # (consumed)
    ld3 = ShardLoader(tmp_path / "d", global_batch_size=12, dp_world_size=4, dp_rank=0, seed=3)
    with pytest.raises(DataError, match="middle of a global batch"):
        ld3.load_state_dict(mid)
    for x in (ld, ld2, ld3):
        x.close()


def test_every_sample_once_across_stop_resume_and_world_changes(tmp_path):
    """Epochs consumed in pieces at world sizes 4 → 1 → 2 still hold every sample exactly once."""
    n = 61  # prime: global batches never align with epochs
    identity_dataset(tmp_path / "d", n, shards=4, rows_per_batch=7)
    a, s1 = consume(tmp_path / "d", 4, 4, g=8)
    b, s2 = consume(tmp_path / "d", 1, 5, g=8, state=s1)
    c, s3 = consume(tmp_path / "d", 2, 8, g=8, state=s2)
    stream = [x for batch in a + b + c for x in batch]
    assert s3["consumed_samples"] == len(stream) == 136
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))


def test_seed_changes_order_and_state_checks(tmp_path):
    identity_dataset(tmp_path / "d", 40)
    a, _ = consume(tmp_path / "d", 1, 2, seed=1)
    b, state = consume(tmp_path / "d", 1, 2, seed=2)
    assert a != b
    ld = ShardLoader(tmp_path / "d", global_batch_size=12, seed=1)
    with pytest.raises(DataError, match="seed"):
        ld.load_state_dict(state)
    identity_dataset(tmp_path / "e", 40, offset=100)
    other = ShardLoader(tmp_path / "e", global_batch_size=12, seed=2)
    with pytest.raises(DataError, match="data changed"):
        other.load_state_dict(state)
    assert {"consumed_samples", "epoch", "data_fingerprint"} <= set(state)
    ld.close(), other.close()


def test_blending_is_deterministic_and_weighted(tmp_path):
    identity_dataset(tmp_path / "a", 30)
    identity_dataset(tmp_path / "b", 20, offset=1000)
    paths = [tmp_path / "a", tmp_path / "b"]
    run1, state = consume(paths, 2, 20, weights=[3, 1])
    run2, _ = consume(paths, 4, 20, weights=[3, 1])
    assert run1 == run2  # reproducible, world-size independent
    stream = [x for b in run1 for x in b]
    from_b = np.cumsum([x >= 1000 for x in stream])
    target = 0.25 * np.arange(1, len(stream) + 1)
    assert np.abs(from_b - target).max() <= 1.0  # every prefix within one sample of the mixture
    a_part = [x for x in stream if x < 1000]
    b_part = [x - 1000 for x in stream if x >= 1000]
    assert sorted(a_part[:30]) == list(range(30)) and sorted(b_part[:20]) == list(range(20))
    assert sorted(b_part[20:40]) == list(range(20))  # the small dataset repeats, once per epoch
    assert state["counts"] == [180, 60]
    # resume inside a blend
    first, s = consume(paths, 2, 7, weights=[3, 1])
    rest, _ = consume(paths, 1, 13, weights=[3, 1], state=s)
    assert first + rest == run1
    fp_a = ShardLoader(paths, [3, 1], global_batch_size=4).data_fingerprint
    fp_b = ShardLoader(paths, [1, 1], global_batch_size=4).data_fingerprint
    assert fp_a != fp_b


def test_prefetch_matches_inline_and_hides_io(tmp_path):
    identity_dataset(tmp_path / "d", 100, shards=5)
    a, _ = consume(tmp_path / "d", 1, 6, prefetch=0)
    b, _ = consume(tmp_path / "d", 1, 6, prefetch=3)
    assert a == b
    ld = ShardLoader(tmp_path / "d", global_batch_size=4, seed=0, prefetch=3)
    next(ld)
    time.sleep(0.3)  # a "training step": the thread fills the queue meanwhile
    t0 = time.perf_counter()
    next(ld), next(ld), next(ld)
    assert time.perf_counter() - t0 < 0.05
    ld.close()


def test_bounded_cache(tmp_path):
    identity_dataset(tmp_path / "d", 300, shards=6, rows_per_batch=10)
    ld = ShardLoader(tmp_path / "d", global_batch_size=10, seed=0, prefetch=0, cache_mb=0.002, max_open_files=2)
    for _ in range(60):
        next(ld)
        assert len(ld._reader._open) <= 2
        assert len(ld._reader._batches) == 1 or ld._reader._cached <= 0.002 * 2**20
    ld.close()


def test_latent_batches_are_float32(tmp_path):
    from data_pipeline.shards import ShardSpec, ShardWriter
    from data_pipeline.manifest import Manifest, ShardEntry, write_manifest

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, (10, 8))
    mu = rng.standard_normal((10, 2, 16)).astype(np.float32)
    ls = rng.standard_normal((10, 2, 16)).astype(np.float32)
    spec = ShardSpec("latents", 8, "uint16", 4, 16, "int8")
    with ShardWriter(tmp_path / "latents-00000.arrow", spec) as w:
        w.add(ids, mu, ls)
        info = w.finish()
    m = Manifest("latents", "lm", 4, 2, 8, "uint16", {"fingerprint": "tok"},
                 [ShardEntry(info.path.name, 10, 80, info.bytes, info.sha256)],
                 latent={"latent_dim": 16, "dtype": "int8", "ae_fingerprint": "ae"})
    write_manifest(m, tmp_path)
    ld = ShardLoader(tmp_path, global_batch_size=10, seed=0, return_index=True,
                     expect=dict(k=4, latent_dim=16, ae_fingerprint="ae", tokenizer_fingerprint="tok"))
    b = next(ld)
    assert b["ids"].dtype == torch.int64 and b["ids"].shape == (10, 8)
    assert b["mu"].dtype == torch.float32 and b["mu"].shape == (10, 2, 16) and b["log_sigma"].shape == (10, 2, 16)
    order = b["index"].numpy()
    assert np.array_equal(b["ids"].numpy(), ids[order])
    step = np.abs(mu[order]).max(-1, keepdims=True) / 127
    assert (np.abs(b["mu"].numpy() - mu[order]) <= 0.51 * step + 1e-6).all()
    ld.close()


def test_corrupted_shard_raises_from_the_prefetch_thread(tmp_path):
    m = identity_dataset(tmp_path / "d", 40, shards=1, rows_per_batch=4)
    path = m.shard_path(m.shards[0])
    data = bytearray(path.read_bytes())
    # flip a byte in every record batch body (not the footer) so that any read hits one
    for pos in range(200, len(data) - 600, 50):
        data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    ld = ShardLoader(tmp_path / "d", global_batch_size=8, seed=0, prefetch=2)
    t0 = time.perf_counter()
    with pytest.raises(ShardError, match="tokens-00000.arrow"):
        for _ in range(10):
            next(ld)
    assert time.perf_counter() - t0 < 10
    ld.close()


WORKER = r"""
import json, sys
from data_pipeline.loader import ShardLoader
path, rank, world, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ld = ShardLoader(path, global_batch_size=12, micro_batch_size=3, dp_rank=rank, dp_world_size=world, seed=7)
got = []
for _ in range(steps * ld.micro_steps):
    got.append(ld.__next__()["ids"][:, 0].tolist())
json.dump({"batches": got, "state": ld.state_dict()}, open(out, "w"))
ld.close()
"""


def test_real_processes_read_disjoint_parts(tmp_path):
    n = 48
    identity_dataset(tmp_path / "d", n)
    launch_ranks(2, lambda r: ["-c", WORKER, str(tmp_path / "d"), str(r), "2", "4", str(tmp_path / f"r{r}.json")],
                 tmp_path / "logs", module=None).wait(120)
    res = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    assert res[0]["state"] == res[1]["state"]
    all_ids = [x for r in res for b in r["batches"] for x in b]
    assert sorted(all_ids) == list(range(n))  # 4 steps × 12 = one epoch, split between the two ranks
    ref, _ = consume(tmp_path / "d", 1, 4, seed=7)
    per_step = [res[0]["batches"][2 * s] + res[0]["batches"][2 * s + 1] + res[1]["batches"][2 * s]
                + res[1]["batches"][2 * s + 1] for s in range(4)]
    assert per_step == ref
    assert Counter(all_ids) == Counter(range(n))
