"""calm-data tokenize: formats, layouts, worker processes, resume after a kill, bad input."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.errors import InputError, ManifestError
from data_pipeline.manifest import load_manifest, read_done
from data_pipeline.shards import ShardReader
from data_pipeline.tokenize import TokenizeConfig, pack_ae, pack_lm, run_tokenize, split_long_text
from data_pipeline.tokenizers import load_tokenizer
from tests.helpers import REPO, SHARED_DATA
from tests.helpers.data import write_jsonl

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def documents(n_bytes: int) -> list[str]:
    """Real English (the standard library's pydoc topics), repeated with variations up to n_bytes."""
    import pydoc_data.topics as topics

    base = [topics.topics[k] for k in sorted(topics.topics)]
    out, size, r = [], 0, 0
    while size < n_bytes:
        for t in base:
            doc = f"[{r}] {t}" if r else t
            out.append(doc)
            size += len(doc)
            if size >= n_bytes:
                break
        r += 1
    return out


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer("demo")


def all_ids(out_dir) -> np.ndarray:
    m = load_manifest(out_dir)
    parts = []
    for e in m.shards:
        with ShardReader(m.shard_path(e)) as r:
            parts.append(r.read_samples(np.arange(r.num_samples))["ids"])
    return np.concatenate(parts) if parts else np.zeros((0, m.sample_tokens), dtype=np.int64)


def tokenize(inputs, out, **kw):
    cfg = dict(inputs=[str(i) for i in inputs], output=str(out), tokenizer="demo", k=4, seq_chunks=16,
               workers=0, progress=False)
    cfg.update(kw)
    return run_tokenize(TokenizeConfig(**cfg))


# --------------------------------------------------------------------------------------------
def test_pack_lm_and_ae():
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34]]
    s, dropped = pack_lm(docs, 4, sep_id=2)
    stream = [10, 11, 12, 2, 20, 2, 30, 31, 32, 33, 34, 2]
    assert s.tolist() == [stream[0:4], stream[4:8], stream[8:12]] and dropped == 0
    s, dropped = pack_lm(docs, 5, sep_id=None, bos_id=1)
    assert s.tolist() == [[1, 10, 11, 12, 1], [20, 1, 30, 31, 32]] and dropped == 2
    s, pads = pack_ae(docs, 8, k=4, eos_id=2, pad_id=0)
    assert s.tolist() == [[10, 11, 12, 2, 20, 2, 0, 0], [30, 31, 32, 33, 34, 2, 0, 0]] and pads == 4
    s, pads = pack_ae([[5, 6, 7]], 12, k=2, eos_id=2, pad_id=0)
    assert s.tolist() == [[5, 6, 7, 2, 0, 0, 0, 0, 0, 0, 0, 0]] and pads == 8


def test_split_long_text_keeps_the_ids(demo):
    text = "\n\n".join(documents(60_000))
    pieces = split_long_text(text, 5000)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 5000 and len(pieces) > 12
    whole = demo.encode(text)
    assert [t for p in demo.encode_batch(pieces) for t in p] == whole
    if (SHARED_DATA / "llama3_tokenizer").is_dir():
        llama = load_tokenizer(f"llama3:{SHARED_DATA / 'llama3_tokenizer'}")
        assert [t for p in llama.encode_batch(pieces) for t in p] == llama.encode(text)
    nospace = "x" * 12_345
    assert "".join(split_long_text(nospace, 1000)) == nospace  # hard cuts when there is no space


def test_input_formats_give_identical_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(150_000)
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "a.jsonl.zst", docs, compress=True)
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=50)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:04d}.txt").write_text(d)
    shas = {}
    for name, inp in [("jsonl", tmp_path / "a.jsonl"), ("zst", tmp_path / "a.jsonl.zst"),
                      ("parquet", tmp_path / "a.parquet"), ("text", tmp_path / "txt" / "*.txt")]:
        m = tokenize([inp], tmp_path / f"out-{name}", shard_text_mb=0.05)
        assert m.stats["documents"] == len(docs)
        shas[name] = [e.sha256 for e in m.shards]
    assert len(shas["jsonl"]) >= 3
    assert shas["jsonl"] == shas["zst"] == shas["parquet"] == shas["text"]


def test_layouts(tmp_path, demo):
    docs = documents(20_000)
    write_jsonl(tmp_path / "d.jsonl", docs)
    tokenize([tmp_path / "d.jsonl"], tmp_path / "ae", layout="ae", seq_chunks=8)
    ae = all_ids(tmp_path / "ae")
    stream = ae.reshape(-1).tolist()
    # every document + EOS starts at a chunk boundary and is padded with PAD up to the next one
    got, i = [], 0
    while i < len(stream) and stream[i] != 0:
        assert i % 4 == 0
        j = stream.index(2, i)
        got.append(demo.decode(stream[i:j]))
        i = j + 1
        while i % 4:
            assert stream[i] == 0
            i += 1
    assert all(t == 0 for t in stream[i:]) and len(stream) - i < 32  # the last sample is padded
    assert got == docs
    tokenize([tmp_path / "d.jsonl"], tmp_path / "lm", layout="lm", seq_chunks=8)
    lm = all_ids(tmp_path / "lm")
    joined = [t for d in demo.encode_batch(docs) for t in d + [2]]
    assert lm.shape[1] == 32 and lm.reshape(-1).tolist() == joined[: lm.size]
    assert len(joined) - lm.size < 32  # only the tail that does not fill a block is dropped
    m = load_manifest(tmp_path / "lm")
    assert m.stats["dropped_tokens"] == len(joined) - lm.size and m.layout == "lm" and m.k == 4
    assert m.tokenizer["fingerprint"] == demo.fingerprint and m.num_samples == len(lm)


def test_workers_resume_after_kill_and_idempotence(tmp_path):
    docs = documents(2_500_000)
    write_jsonl(tmp_path / "c.jsonl.zst", docs, compress=True)
    args = ["tokenize", str(tmp_path / "c.jsonl.zst"), "--tokenizer", "demo", "--seq-chunks", "16",
            "--shard-text-mb", "0.05", "--no-progress"]
    ref = tokenize([tmp_path / "c.jsonl.zst"], tmp_path / "ref", shard_text_mb=0.05)
    assert len(ref.shards) >= 30

    # two worker processes, killed (SIGKILL, whole process group) once a few shards are finished
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", *args, "-o", str(out), "-j", "2"],
                            env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.done"))) < 4:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {}
    for p in sorted(out.glob("tokens-*.arrow")):
        entry = read_done(p)
        if entry is not None:  # a shard with a valid record is complete and identical to the reference
            finished[p.name] = (p.stat().st_ino, p.stat().st_mtime_ns)
            assert entry.sha256 == ref.shards[int(p.name[7:12])].sha256
    assert finished, proc.stderr.read().decode()[-2000:]
    assert len(finished) < len(ref.shards) and not (out / "manifest.json").exists()  # killed mid-job

    # re-run: finishes the job, rewrites nothing that was finished
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", *args, "-o", str(out), "-j", "2"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(out)
    assert [e.sha256 for e in m.shards] == [e.sha256 for e in ref.shards]
    assert m.to_dict()["shards"] == ref.to_dict()["shards"] and m.stats == ref.stats
    for name, stamp in finished.items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was redone"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # a damaged shard is redone on the next run; the others are left alone
    victim = out / m.shards[3].file
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = (out / m.shards[0].file).stat().st_mtime_ns
    again = tokenize([tmp_path / "c.jsonl.zst"], out, shard_text_mb=0.05)
    assert [e.sha256 for e in again.shards] == [e.sha256 for e in ref.shards]
    assert (out / m.shards[0].file).stat().st_mtime_ns == before

    # the same directory with other parameters is refused
    with pytest.raises(ManifestError, match="seq_chunks: 16 .recorded. vs 32"):
        tokenize([tmp_path / "c.jsonl.zst"], out, shard_text_mb=0.05, seq_chunks=32)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_empty_invalid_and_malformed_records_are_counted(tmp_path, demo):
    lines = [b'{"text": "first document"}', b'{"text": ""}', b'{"text": null}', b'{"text": "bad \xff\xfe utf8"}',
             b'this is not json', b'["a list"]', b'{"text": "lone \\ud800 surrogate"}', b'',
             b'{"text": "second document"}', b'{"text": "cut off']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines))
    m = tokenize([tmp_path / "bad.jsonl"], tmp_path / "out", seq_chunks=2, layout="ae")
    st = m.stats
    assert (st["documents"], st["empty_documents"], st["invalid_utf8"], st["malformed_lines"]) == (2, 2, 2, 3)
    ids = all_ids(tmp_path / "out").reshape(-1).tolist()
    text = demo.decode([t for t in ids if t > 2])
    assert text == "first documentsecond document"


def test_missing_text_field_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", ["a", "b"], field="content")
    with pytest.raises(InputError, match=r"x.jsonl:1: no field 'text' in the record \(fields: content\)"):
        tokenize([tmp_path / "x.jsonl"], tmp_path / "out")
    m = tokenize([tmp_path / "x.jsonl"], tmp_path / "out2", text_field="content")
    assert m.stats["documents"] == 2
    (tmp_path / "y.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(InputError, match="y.jsonl:1: field 'text' is a int"):
        tokenize([tmp_path / "y.jsonl"], tmp_path / "out3")
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "tokenize", str(tmp_path / "x.jsonl"), "-o",
                        str(tmp_path / "out4"), "-j", "0", "--no-progress"], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "no field 'text'" in r.stderr and "Traceback" not in r.stderr


def test_truncated_zstd_input_is_an_error(tmp_path):
    write_jsonl(tmp_path / "c.jsonl.zst", documents(200_000), compress=True)
    data = (tmp_path / "c.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="cut.jsonl.zst.*truncated"):
        tokenize([tmp_path / "cut.jsonl.zst"], tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        tokenize([tmp_path / "missing.jsonl"], tmp_path / "out2")


def test_hub_name_without_hub_is_a_clear_error(tmp_path):
    t0 = time.time()
    with pytest.raises(InputError, match="someone/some-dataset.*cannot open with datasets"):
        tokenize(["someone/some-dataset"], tmp_path / "out")
    assert time.time() - t0 < 30


def test_ten_megabyte_document(tmp_path):
    """One 10 MB document (and a 1 MB one without any space) go through in bounded time with the ids of
    the whole text."""
    spec = f"llama3:{SHARED_DATA / 'llama3_tokenizer'}" if (SHARED_DATA / "llama3_tokenizer").is_dir() else "demo"
    tok = load_tokenizer(spec)
    big = "\n\n".join(documents(10_000_000))[:10_000_000]
    nospace = "ab" * 500_000
    write_jsonl(tmp_path / "big.jsonl", ["small one", big, nospace])
    t0 = time.time()
    m = tokenize([tmp_path / "big.jsonl"], tmp_path / "out", tokenizer=spec, seq_chunks=256, shard_text_mb=4)
    elapsed = time.time() - t0
    assert m.stats["documents"] == 3 and len(m.shards) == 2
    with ShardReader(m.shard_path(m.shards[0])) as r:  # "small one" EOS big EOS, minus the dropped tail
        ids = r.read_samples(np.arange(r.num_samples))["ids"].reshape(-1).tolist()
    expected = tok.encode("small one") + [tok.eos_id] + tok.encode(big) + [tok.eos_id]
    assert len(expected) - len(ids) == m.shards[0].stats["dropped_tokens"] < 1024
    assert ids == expected[:len(ids)]
    assert elapsed < 120
