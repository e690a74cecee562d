"""Hostile and unlucky input to releases, exports and the data pipeline (issue 15): each case ends in one
clear message naming the problem and the file, or in correct behaviour, with nothing lost.

Everything runs for real: a tiny tokenizer, token shards, an autoencoder release, latents encoded with it
by ``calm-data encode``, a CALM trained on them by ``calm-pretrain train``, and ``calm-pretrain export``.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from calm_pretrain.cli import main as cli_main
from calm_pretrain.release import ReleaseError, ReleaseWarning, export_release, import_release
from tests.conftest import REPO

V = 300  # vocabulary of the tokenizer, the autoencoder and CALM
CALM_SMALL = [f"model.vocab_size={V}", "model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=1",
              "model.num_heads=2", "model.num_kv_heads=2", "model.latent_dim=16", "model.head.noise_size=8",
              "model.head.num_blocks=1", "model.head.num_samples=2", "model.head.num_target_samples=4",
              "data.seq_chunks=8", "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_every=1",
              "train.engine=torch", "train.wandb=off", "train.save_every=2", "train.keep_last=5"]


def _tokenizer(directory, text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.tokenizers import DEMO_SPECIALS, HFTokenizer, load_tokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=DEMO_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text] * 20, trainer=trainer)
    pad, bos, eos = DEMO_SPECIALS[0], DEMO_SPECIALS[1], DEMO_SPECIALS[2]
    HFTokenizer(tk, str(directory), "bpe", bos, eos, pad).save(directory, bos=bos, eos=eos, pad=pad)
    return load_tokenizer(str(directory))


def _train(config_dir, run, latents, *overrides):
    cfg = config_dir / f"{run.name}.yaml"
    cfg.write_text((REPO / "configs/tiny/calm.yaml").read_text())
    argv = ["train", "--config", str(cfg), *CALM_SMALL, f"data.train=[{latents}]", f"train.output_dir={run}",
            *overrides]
    assert cli_main(argv) == 0
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tokenizer → token shards → AE release → latents (calm-data encode) → two CALM training runs."""
    from calm_pretrain.models import build_model
    from data_pipeline.cli import main as data_main
    from data_pipeline.testing import tiny_ae_config, write_token_dataset

    root = tmp_path_factory.mktemp("world")
    tok = _tokenizer(root / "tokenizer", "the release layout of the published checkpoints")
    _tokenizer(root / "other_tokenizer", "a different corpus gives different merges entirely")
    write_token_dataset(root / "tokens", np.random.default_rng(0).integers(3, 64, (16, 32)), k=4, vocab_size=V,
                        tokenizer=tok.describe())
    for name, seed in (("ae", 0), ("other_ae", 1)):
        torch.manual_seed(seed)
        export_release(build_model(tiny_ae_config(vocab_size=V, latent_dim=16, hidden_size=32, intermediate_size=48))
                       .eval(), root / name)
    assert data_main(["encode", str(root / "tokens"), "--ae", str(root / "ae"), "-o", str(root / "latents"),
                      "--no-progress"]) == 0
    _train(root, root / "run", root / "latents", "train.max_steps=4")
    _train(root, root / "run_seed2", root / "latents", "train.max_steps=2", "train.seed=2")
    return root


def _export(capsys, *argv):
    rc = cli_main(["export", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _sidecar(d):
    return json.loads((d / "calm_pretrain.json").read_text())


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


# --------------------------------------------------------------------------------------------
# Item 5: export --out over an existing release
# --------------------------------------------------------------------------------------------
def test_export_out_never_replaces_a_release_of_another_model(world, tmp_path, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(world / "ae", ae)
    before = _files(ae)
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", ae, "--overwrite")
    assert rc == 1 and "holds a release of another model (Autoencoder" in err and str(ae) in err
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", ae, "--embed-ae", ae)
    assert rc == 1 and "is the autoencoder release given to --embed-ae" in err
    assert _files(ae) == before  # the AE the latents point to is untouched

    out = tmp_path / "calm"
    assert _export(capsys, "--checkpoint", world / "run", "--out", out)[0] == 0
    assert _export(capsys, "--checkpoint", world / "run", "--out", out)[0] == 0  # the same checkpoint again
    # another training run of the same model: refused even with --overwrite
    rc, _, err = _export(capsys, "--checkpoint", world / "run_seed2", "--out", out, "--overwrite")
    assert rc == 1 and "holds a release of another training run of this model" in err
    # another checkpoint of the same run: only with --overwrite
    step2 = world / "run" / "checkpoints" / "step_00000002"
    rc, _, err = _export(capsys, "--checkpoint", step2, "--out", out)
    assert rc == 1 and "already holds a release of this model (step 4 of" in err and "needs --overwrite" in err
    assert _sidecar(out)["source"]["step"] == 4
    assert _export(capsys, "--checkpoint", step2, "--out", out, "--overwrite")[0] == 0
    assert _sidecar(out)["source"]["step"] == 2


# --------------------------------------------------------------------------------------------
# Item 6: export --embed-ae / --tokenizer the CALM was not trained with
# --------------------------------------------------------------------------------------------
def test_export_refuses_an_autoencoder_or_tokenizer_the_calm_was_not_trained_with(world, tmp_path, capsys):
    from data_pipeline.ae_io import autoencoder_fingerprint, load_autoencoder
    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizers import load_tokenizer

    right = autoencoder_fingerprint(load_autoencoder(world / "ae"))
    wrong = autoencoder_fingerprint(load_autoencoder(world / "other_ae"))
    state = json.loads((world / "run" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["data_sources"]["ae_fingerprint"] == right == load_manifest(world / "latents").ae_fingerprint
    assert state["config"]["model"]["ae_path"] is None  # recorded although the run loads no AE

    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "a", "--embed-ae",
                         world / "other_ae")
    assert rc == 1 and f"has fingerprint {wrong}" in err and f"fingerprint {right}" in err
    rc, _, err = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "b", "--tokenizer",
                         world / "other_tokenizer")
    tok_right, tok_wrong = (load_tokenizer(str(world / n)).fingerprint for n in ("tokenizer", "other_tokenizer"))
    assert rc == 1 and f"tokenizer {world / 'other_tokenizer'} has fingerprint {tok_wrong}" in err and tok_right in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    rc, _, _ = _export(capsys, "--checkpoint", world / "run", "--out", tmp_path / "ok", "--embed-ae", world / "ae",
                       "--tokenizer", world / "tokenizer")
    assert rc == 0
    source = _sidecar(tmp_path / "ok")["source"]
    assert source["embedded_ae_fingerprint"] == right and source["data"]["tokenizer_fingerprint"] == tok_right


# --------------------------------------------------------------------------------------------
# Item 7: export falling back to an older checkpoint
# --------------------------------------------------------------------------------------------
def test_export_says_which_checkpoint_it_exports_and_warns_on_a_fallback(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    rc, out, err = _export(capsys, "--checkpoint", run, "--out", tmp_path / "newest")
    assert rc == 0 and "exported step 4 of" in out and "warning" not in err
    assert _sidecar(tmp_path / "newest")["source"]["fallback"] is None

    engine_file = next((run / "checkpoints" / "step_00000004" / "engine").iterdir())
    engine_file.write_bytes(engine_file.read_bytes()[:100])  # truncated
    rc, out, err = _export(capsys, "--checkpoint", run, "--out", tmp_path / "older")
    assert rc == 0 and "exported step 2 of" in out
    assert "warning: exporting" in err and "(step 2), not the newest checkpoint: step_00000004 is damaged" in err
    source = _sidecar(tmp_path / "older")["source"]
    assert source["step"] == 2 and source["checkpoint"].endswith("step_00000002")
    assert "step_00000004 is damaged" in source["fallback"]
    assert cli_main(["release-info", str(tmp_path / "older")]) == 0
    assert "exported from: step 2 of" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Item 10: a release whose config.json was edited
# --------------------------------------------------------------------------------------------
def _edit(path, **values):
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))


def test_an_edited_release_config_is_refused_naming_the_fields(world, tmp_path, capsys):
    from data_pipeline.ae_io import load_autoencoder
    from data_pipeline.errors import DataError

    calm = tmp_path / "calm"
    assert _export(capsys, "--checkpoint", world / "run", "--out", calm)[0] == 0
    assert cli_main(["release-info", str(calm)]) == 0
    assert "as exported (fingerprint of config and weights): yes" in capsys.readouterr().out
    _edit(calm / "config.json", rope_theta=20000.0, rms_norm_eps=1e-3)  # shapes unchanged
    assert cli_main(["release-info", str(calm)]) == 1
    out = capsys.readouterr().out
    assert "names and shapes match the config: yes" in out
    assert "as exported (fingerprint of config and weights): NO" in out
    assert "config.json rms_norm_eps: 1e-06 -> 0.001" in out and "config.json rope_theta: 10000.0 -> 20000.0" in out
    with pytest.raises(ReleaseError, match=r"config.json rms_norm_eps: 1e-06 -> 0.001; config.json rope_theta"):
        import_release(calm)

    ae = tmp_path / "ae"
    shutil.copytree(world / "ae", ae)
    _edit(ae / "config.json", rms_norm_eps=1e-2)
    with pytest.raises(DataError, match=r"ae: differs from what was exported .*config.json rms_norm_eps: 1e-06 -> 0.01"):
        load_autoencoder(ae)  # what calm-data encode and the trainer load
    weights = ae / "model.safetensors"
    shutil.copy(world / "other_ae" / "model.safetensors", weights)  # same names and shapes, other weights
    _edit(ae / "config.json", rms_norm_eps=1e-6)
    with pytest.raises(ReleaseError, match="weight file model.safetensors changed"):
        import_release(ae)

    # unknown fields are reported; the published layout (no fingerprint) loads, said to be unverified
    published = tmp_path / "published"
    shutil.copytree(world / "ae", published)
    (published / "calm_pretrain.json").unlink()
    _edit(published / "config.json", sliding_window=64)
    with pytest.warns(ReleaseWarning) as caught:
        import_release(published)
    messages = [str(w.message) for w in caught]
    assert any("unverified: no fingerprint recorded" in m for m in messages)
    assert any("field(s) sliding_window are not read by calm_pretrain" in m for m in messages)
    assert cli_main(["release-info", str(published)]) == 0
    out = capsys.readouterr().out
    assert "unverified (no fingerprint recorded" in out and "not read by calm_pretrain (no effect): sliding_window" in out


# --------------------------------------------------------------------------------------------
# A kill during export
# --------------------------------------------------------------------------------------------
KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from calm_pretrain.models import build_model
    from calm_pretrain.release import directory, export_release
    from data_pipeline.testing import tiny_ae_config

    where = sys.argv[2]
    real_replace = os.replace
    def replace(src, dst):  # the kill comes at `where`: while writing, or between the two renames
        real_replace(src, dst)
        if where == "between-renames":
            os.kill(os.getpid(), signal.SIGKILL)
    directory.os.replace = replace
    if where == "writing":
        import safetensors.torch
        safetensors.torch.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    torch.manual_seed(3)
    ae = build_model(tiny_ae_config(vocab_size=300, latent_dim=16, hidden_size=32, intermediate_size=48))
    export_release(ae, sys.argv[1], overwrite=True)
""")


def test_a_killed_export_leaves_no_temporary_directory_behind_the_next_export(world, tmp_path):
    out = tmp_path / "ae"
    shutil.copytree(world / "ae", out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for where in ("writing", "between-renames"):
        killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), where], env=env)
        assert killed.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".ae.tmp-") for n in left) and any(n.startswith(".ae.old-") for n in left)
    assert not out.exists()  # killed between moving the previous release aside and moving the new one in

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_release(import_release(world / "ae")[0], tmp_path / "ae", overwrite=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "restored the previous release from .ae.old-" in messages and "removed .ae.tmp-" in messages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]
    assert _files(out)["model.safetensors"] == (world / "ae" / "model.safetensors").read_bytes()
