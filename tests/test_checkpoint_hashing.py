"""Checkpoint files hashed as they are written, claimed by the rank that wrote them, verified in parallel."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash

from calm_pretrain.parallel.hashed_writes import claim_written, hashed_save, recording
from calm_pretrain.train.checkpoint import CheckpointError, Checkpointer, verify_checkpoint
from calm_pretrain.train.checkpoint_files import share_of
from tests.helpers.ranks import run_distributed_test


class FakeEngine:
    """Writes engine/part_<rank>.pt (hashed as written); `stray` also writes a file nobody claims,
    `vanish` claims a file and deletes it."""
    kind = "torch"

    def __init__(self, rank=0, stray=False, vanish=False, size=1 << 21):
        self.rank, self.stray, self.vanish, self.size = rank, stray, vanish, size

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        hashed_save({"w": torch.arange(self.size // 4, dtype=torch.float32) + self.rank},
                    path / f"part_{self.rank:05d}.pt")
        if self.stray:
            (path / "stray.bin").write_bytes(b"nobody hashed me")
        if self.vanish:
            (path / "gone.bin").write_bytes(b"x")
            claim_written(path / "gone.bin")
            (path / "gone.bin").unlink()


def test_the_manifest_records_the_writer_and_the_hashes_of_the_bytes(tmp_path):
    ck = Checkpointer(tmp_path, log=lambda s: None)
    path = ck.save(1, FakeEngine(), {"note": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 1
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files == ["engine/part_00000.pt", "rng/rank_00000.pt", "trainer_state.json"]
    assert manifest["hash"] == "xxh3_128"
    for rel, (size, digest, rank) in manifest["files"].items():
        data = (path / rel).read_bytes()  # the library's one-shot digest of the bytes on disk
        assert (size, digest, rank) == (len(data), xxhash.xxh3_128(data).hexdigest(), 0), rel
    assert verify_checkpoint(path) is None


def test_a_manifest_from_before_the_hash_was_recorded_is_verified_with_sha256(tmp_path):
    path = Checkpointer(tmp_path, log=lambda s: None).save(1, FakeEngine(), {})
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["hash"]
    for rel, entry in manifest["files"].items():
        entry[1] = hashlib.sha256((path / rel).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(path) is None
    f = path / "engine" / "part_00000.pt"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    assert verify_checkpoint(path) == "engine/part_00000.pt does not match its checksum"
    manifest["hash"] = "md5"
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "manifest.json names an unknown hash 'md5'" in verify_checkpoint(path)


def test_a_hashed_save_is_torch_save(tmp_path):
    obj = {"a": torch.randn(1 << 19), "b": [1, 2, "x"]}
    with recording() as ledger:
        size, digest = hashed_save(obj, tmp_path / "h.pt")  # zip format (torch's default)
        hashed_save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # DeepSpeed's default
    torch.save(obj, tmp_path / "p.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes() == (tmp_path / "p.pt").read_bytes()
    data = (tmp_path / "h.pt").read_bytes()
    assert ledger.relative_to(tmp_path)["h.pt"] == (size, digest) == (len(data), xxhash.xxh3_128(data).hexdigest())
    assert torch.equal(torch.load(tmp_path / "h.pt")["a"], obj["a"])


@pytest.mark.parametrize("engine,named", [(FakeEngine(stray=True), "engine/stray.bin was written but no rank hashed it"),
                                          (FakeEngine(vanish=True), "engine/gone.bin is claimed by rank 0 but missing")])
def test_an_unclaimed_or_missing_file_is_named_and_nothing_saved(tmp_path, engine, named):
    ck = Checkpointer(tmp_path, log=lambda s: None)
    with pytest.raises(CheckpointError, match=named):
        ck.save(1, engine, {})
    assert not (tmp_path / "latest").exists() and not (tmp_path / "step_00000001").exists()


def test_the_split_of_a_manifest_over_ranks():
    files = {"a": [10, "", 0], "b": [30, "", 1], "c": [20, "", 1]}
    assert share_of({"world_size": 2, "files": files}, 0, 2) == ["a"]
    assert share_of({"world_size": 2, "files": files}, 1, 2) == ["b", "c"]
    # another world size (or no writers recorded): by size, every file exactly once
    shares = [share_of({"world_size": 2, "files": files}, r, 3) for r in range(3)]
    assert shares == [["b"], ["c"], ["a"]]
    old = {k: v[:2] for k, v in files.items()}
    assert share_of({"files": old}, 0, 2) + share_of({"files": old}, 1, 2) == ["b", "a", "c"]


def _two_ranks(rank, world_size, root):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    root, logs = Path(root), []
    save = Checkpointer(root, keep_last=3, rank=rank, world_size=world_size, log=lambda s: None)
    for step in (1, 2):
        save.save(step, FakeEngine(rank), {})
    manifest = json.loads((root / "step_00000002" / "manifest.json").read_text())
    assert manifest["files"]["engine/part_00001.pt"][2] == 1 and manifest["files"]["rng/rank_00000.pt"][2] == 0
    dist.barrier()
    if rank == 1:  # rank 1 damages its own file of step 2: only rank 1 checksums it on resume
        f = root / "step_00000002" / "engine" / "part_00001.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    dist.barrier()
    resume = Checkpointer(root, keep_last=3, rank=rank, world_size=world_size, log=logs.append)
    assert resume.find_resumable() == root / "step_00000001"
    assert (root / "latest").read_text().strip() == "step_00000001"
    warning = "\n".join(logs) if rank == 0 else ""
    if rank == 0:
        assert "step_00000002 is damaged (engine/part_00001.pt does not match its checksum)" in warning, warning
    # every rank took the same decision and knows the same problems
    assert resume._problems["step_00000002"] == "engine/part_00001.pt does not match its checksum"


def test_two_ranks_a_damaged_file_of_rank_1_falls_back_and_is_named(tmp_path):
    run_distributed_test(_two_ranks, 2, str(tmp_path / "ck"), timeout=120)


# ---- background saves (train.async_save) -----------------------------------------------------
class StateEngine:
    """An engine whose state is a dict of tensors (two of them views of one storage), saved as is."""
    kind = "torch"

    def __init__(self):
        base = torch.arange(1 << 18, dtype=torch.float32)
        self.state = {"w": base, "half": base[: 1 << 17], "odd": base[1::2], "b": torch.ones(3, dtype=torch.bfloat16),
                      "meta": {"step": 7, "names": ("a", "b")}}

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        hashed_save(self.state, path / "engine.pt")


class Gate:
    """Stands in for the writer's function: each write waits until the test opens the gate."""

    def __init__(self, monkeypatch, fail_on=None):
        import threading

        import calm_pretrain.parallel.hashed_writes as hw
        self.open, self.real, self.fail_on = threading.Event(), hw._write_hashed, fail_on
        monkeypatch.setattr(hw, "_write_hashed", self)

    def __call__(self, obj, path, *args):
        assert self.open.wait(30)
        if self.fail_on and Path(path).name == self.fail_on:
            raise OSError(28, "No space left on device")
        return self.real(obj, path, *args)


def test_a_background_save_writes_the_state_as_it_was_when_save_returned(tmp_path, monkeypatch):
    ck, engine = Checkpointer(tmp_path, log=lambda s: None), StateEngine()
    ck.save(1, engine, {})
    gate = Gate(monkeypatch)
    final = ck.save(2, engine, {"n": 2}, background=True)
    assert ck.pending is not None and not (final / "manifest.json").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"  # nothing committed yet
    assert ck.finish_pending(wait=False) is None  # the writer has not written
    expected = {k: v.clone() for k, v in engine.state.items() if isinstance(v, torch.Tensor)}
    engine.state["w"].add_(1000.0)  # training goes on and changes the live state in place
    gate.open.set()
    assert ck.finish_pending(wait=True) == final and ck.pending is None
    assert (tmp_path / "latest").read_text().strip() == "step_00000002" and verify_checkpoint(final) is None
    saved = torch.load(final / "engine" / "engine.pt")
    for name, value in expected.items():
        assert torch.equal(saved[name], value) and saved[name].dtype == value.dtype, name
    assert saved["meta"] == {"step": 7, "names": ("a", "b")}
    # views of one storage are still views of one storage (torch.save writes it once)
    assert saved["half"].untyped_storage().data_ptr() == saved["w"].untyped_storage().data_ptr()
    assert saved["odd"].stride() == (2,) and saved["odd"].storage_offset() == 1
    sync = Checkpointer(tmp_path / "sync", log=lambda s: None).save(2, StateEngine(), {"n": 2})
    assert (sync / "engine" / "engine.pt").stat().st_size == (final / "engine" / "engine.pt").stat().st_size


def test_a_failed_background_write_is_named_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, log=lambda s: None)
    first = ck.save(1, StateEngine(), {})
    gate = Gate(monkeypatch, fail_on="engine.pt")
    ck.save(2, StateEngine(), {}, background=True)
    gate.open.set()
    with pytest.raises(CheckpointError, match=r"not saved: rank 0 could not write .*engine\.pt: OSError.*No space left"):
        ck.finish_pending(wait=True)
    assert (tmp_path / "latest").read_text().strip() == "step_00000001" and verify_checkpoint(first) is None
    assert not (tmp_path / "step_00000002").exists()
    monkeypatch.undo()  # the disk has room again
    ck.save(3, StateEngine(), {})  # the next save removes the partial directory and goes on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000003"]


def test_a_second_save_waits_for_the_first_one_in_flight(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=5, log=lambda s: None)
    gate = Gate(monkeypatch)
    ck.save(1, StateEngine(), {}, background=True)
    gate.open.set()
    ck.save(2, StateEngine(), {})  # commits step 1 first: never two snapshots in memory
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000001", "step_00000002"]
    assert all(verify_checkpoint(p) is None for p in ck.complete_checkpoints())


def test_background_saves_reuse_their_host_memory_and_write_each_saves_state(tmp_path):
    ck, engine = Checkpointer(tmp_path, keep_last=5, log=lambda s: None), StateEngine()
    first = ck.save(1, engine, {}, background=True)
    ck.finish_pending()
    held = sorted(b.data_ptr() for bufs in ck._buffers._free.values() for b in bufs)
    original = engine.state["w"].clone()
    engine.state["w"].mul_(-1.0)
    second = ck.save(2, engine, {}, background=True)
    ck.finish_pending()
    assert sorted(b.data_ptr() for bufs in ck._buffers._free.values() for b in bufs) == held  # no new memory
    assert torch.equal(torch.load(first / "engine" / "engine.pt")["w"], original)
    assert torch.equal(torch.load(second / "engine" / "engine.pt")["w"], -original)
    assert verify_checkpoint(first) is None and verify_checkpoint(second) is None
