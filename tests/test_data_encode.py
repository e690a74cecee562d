"""Pre-encoding: the AE checkpoint directory, latent shards (bf16 / int8 / int8-ls4), ranks, compatibility checks."""
import json

import numpy as np
import pytest
import torch

from calm_pretrain.release.autoencoder import load_autoencoder, save_autoencoder

from data_pipeline.ae_io import autoencoder_fingerprint
from data_pipeline.encode import EncodeConfig, run_encode
from data_pipeline.errors import DataError, IncompatibleDataError
from data_pipeline.loader import ShardLoader
from data_pipeline.manifest import check_compatible, load_manifest
from data_pipeline.shards import ShardReader
from tests.helpers.data import write_token_dataset
from tests.helpers.models import tiny_ae_config
from tests.helpers.ranks import launch_ranks


def make_ae(seed=0, **kw):
    from calm_pretrain.models.autoencoder.model import Autoencoder

    torch.manual_seed(seed)
    return Autoencoder(tiny_ae_config(**kw)).eval()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    ids = np.random.default_rng(0).integers(3, 4096, (45, 32))
    write_token_dataset(d, ids, k=4, shards=3, rows_per_batch=4)
    return d


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae")
    save_autoencoder(make_ae(), d)
    return d


def test_ae_directory_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    ae = make_ae(seed=1)
    save_autoencoder(ae, tmp_path / "ae")
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["latent_dim"] == 16
    back = load_autoencoder(tmp_path / "ae")
    assert back.decoder.lm_head_weight is back.encoder.embed_tokens.weight  # tied again
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    assert autoencoder_fingerprint(back) == autoencoder_fingerprint(ae)
    ids = torch.randint(3, 4096, (2, 16))
    assert torch.equal(back.encode(ids)[0], ae.encode(ids)[0])
    assert torch.equal(back.decode(ae.encode(ids)[0]), ae.decode(ae.encode(ids)[0]))
    with torch.no_grad():
        back.decoder.latent_to_hidden.bias[0] += 1e-3
    assert autoencoder_fingerprint(back) != autoencoder_fingerprint(ae)
    assert autoencoder_fingerprint(make_ae(seed=1, kl_weight=0.01)) != autoencoder_fingerprint(ae)  # config counts

    state = load_file(str(tmp_path / "ae" / "model.safetensors"))
    state["decoder.lm_head_weight"] = state["decoder.lm_head_weight"] + 1
    save_file(state, str(tmp_path / "ae" / "model.safetensors"))
    with pytest.raises(DataError, match="tied"):
        load_autoencoder(tmp_path / "ae")
    state.pop("decoder.lm_head_weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "ae" / "model.safetensors"))
    with pytest.raises(DataError, match="do not match the config"):
        load_autoencoder(tmp_path / "ae")
    (tmp_path / "ae" / "config.json").unlink()
    with pytest.raises(DataError, match="config.json is missing"):
        load_autoencoder(tmp_path / "ae")


def read_all(directory):
    m = load_manifest(directory)
    out = {}
    for e in m.shards:
        with ShardReader(m.shard_path(e)) as r:
            for k, v in r.read_samples(np.arange(r.num_samples)).items():
                out.setdefault(k, []).append(v)
    return m, {k: np.concatenate(v) for k, v in out.items()}


def test_encode_bf16_int8_and_int8_ls4(tmp_path, tokens, ae_dir):
    tm, tok = read_all(tokens)
    ae = load_autoencoder(ae_dir)
    with torch.no_grad():
        mu, ls = (x.numpy() for x in ae.encode(torch.from_numpy(tok["ids"])))
    for dtype in ("bf16", "int8", "int8-ls4"):
        out = tmp_path / dtype
        m = run_encode(EncodeConfig(tokens=str(tokens), ae=str(ae_dir), output=str(out), dtype=dtype, batch_size=7,
                                    progress=False), load_autoencoder)
        assert m is not None and m.kind == "latents" and m.num_samples == 45 and len(m.shards) == 3
        assert (m.k, m.seq_chunks, m.latent_dim, m.latent["dtype"]) == (4, 8, 16, dtype)
        assert m.ae_fingerprint == autoencoder_fingerprint(ae) and m.tokenizer == tm.tokenizer
        assert m.latent["token_manifest"]["fingerprint"] == tm.fingerprint()
        _, got = read_all(out)
        assert np.array_equal(got["ids"], tok["ids"])
        for name, ref in (("mu", mu), ("log_sigma", ls)):
            scale = np.abs(ref).max(-1, keepdims=True)
            tol = 2 ** -8 * scale if dtype == "bf16" else 0.51 * scale / 127 + 1e-6
            if dtype == "int8-ls4" and name == "log_sigma":  # 4 bits over the vector's range, float16 offset
                tol = 0.51 * (ref.max(-1, keepdims=True) - ref.min(-1, keepdims=True)) / 15 + scale * 2 ** -10
            assert got[name].shape == (45, 8, 16) and (np.abs(got[name] - ref) <= tol).all()
        stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")}
        again = run_encode(EncodeConfig(tokens=str(tokens), ae=str(ae_dir), output=str(out), dtype=dtype,
                                        progress=False), load_autoencoder)
        assert again.to_dict() == m.to_dict()
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")} == stamps  # nothing redone
    with pytest.raises(DataError, match="different job"):
        run_encode(EncodeConfig(tokens=str(tokens), ae=str(ae_dir), output=str(tmp_path / "bf16"), dtype="int8",
                                progress=False), load_autoencoder)


def test_encode_ranks_as_separate_processes(tmp_path, tokens, ae_dir):
    single = run_encode(EncodeConfig(tokens=str(tokens), ae=str(ae_dir), output=str(tmp_path / "one"),
                                     progress=False), load_autoencoder)
    ranks = launch_ranks(2, ["encode", str(tokens), "--ae", str(ae_dir), "-o", str(tmp_path / "two"), "--device",
                             "cpu", "--no-progress"], tmp_path / "logs", module="data_pipeline.cli")
    ranks.wait(180)
    two = load_manifest(tmp_path / "two")
    assert [e.sha256 for e in two.shards] == [e.sha256 for e in single.shards]
    assert two.num_samples == 45 and two.ae_fingerprint == single.ae_fingerprint
    # each rank wrote only its own shards: 0 and 2 by rank 0, 1 by rank 1 (one process each, no collisions)
    assert sorted(p.name for p in (tmp_path / "two").glob("latents-*.arrow")) == [e.file for e in two.shards]


def test_check_compatible_names_both_values_and_the_file(tmp_path, tokens, ae_dir):
    m = run_encode(EncodeConfig(tokens=str(tokens), ae=str(ae_dir), output=str(tmp_path / "lat"), progress=False), load_autoencoder)
    ok = dict(k=4, latent_dim=16, ae_fingerprint=m.ae_fingerprint, tokenizer_fingerprint="test-tokenizer")
    check_compatible(m.path, **ok)
    path = str(tmp_path / "lat" / "manifest.json")
    for key, bad, shown in [("k", 8, "K"), ("latent_dim", 128, "latent dim"),
                            ("ae_fingerprint", "0123456789abcdef", "autoencoder fingerprint"),
                            ("tokenizer_fingerprint", "other", "tokenizer fingerprint")]:
        with pytest.raises(IncompatibleDataError) as e:
            check_compatible(m, **{**ok, key: bad})
        msg = str(e.value)
        assert path in msg and shown in msg and repr(bad) in msg and repr(ok[key] if key != "k" else 4) in msg
        with pytest.raises(IncompatibleDataError):
            ShardLoader(tmp_path / "lat", global_batch_size=2, expect={**ok, key: bad})
    with pytest.raises(IncompatibleDataError, match="holds tokens shards, but the run needs latent shards"):
        check_compatible(tokens, latent_dim=16)
    ld = ShardLoader(tmp_path / "lat", global_batch_size=3, expect=ok)
    b = next(ld)
    assert b["mu"].shape == (3, 8, 16) and b["mu"].dtype == torch.float32 and b["ids"].shape == (3, 32)
    ld.close()


def test_encode_refuses_an_autoencoder_of_another_tokenizer(tmp_path, tokens):
    save_autoencoder(make_ae(eos_token_id=5), tmp_path / "ae5")
    with pytest.raises(IncompatibleDataError, match="eos_id = 2 but the autoencoder's config has 5"):
        run_encode(EncodeConfig(tokens=str(tokens), ae=str(tmp_path / "ae5"), output=str(tmp_path / "o"),
                                progress=False), load_autoencoder)
    save_autoencoder(make_ae(k=3), tmp_path / "ae3")
    with pytest.raises(IncompatibleDataError, match="not a multiple of the autoencoder's K = 3"):
        run_encode(EncodeConfig(tokens=str(tokens), ae=str(tmp_path / "ae3"), output=str(tmp_path / "o3"),
                                progress=False), load_autoencoder)
