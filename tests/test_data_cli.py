"""The calm-data command line: tokenize → encode → inspect → verify, and its error exits."""
import os
import subprocess
import sys

import pytest

from calm_pretrain.release.autoencoder import save_autoencoder
from data_pipeline.cli import main
from tests.helpers import REPO
from tests.helpers.data import write_jsonl
from tests.helpers.models import tiny_ae_config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Real text → demo-tokenized LM shards → latents of a tiny random autoencoder."""
    import pydoc_data.topics as topics
    import torch

    from calm_pretrain.models.autoencoder.model import Autoencoder

    d = tmp_path_factory.mktemp("cli")
    write_jsonl(d / "docs.jsonl.zst", [topics.topics[k] for k in sorted(topics.topics)[:60]], compress=True)
    assert main(["tokenize", str(d / "docs.jsonl.zst"), "-o", str(d / "tok"), "--tokenizer", "demo",
                 "--seq-chunks", "16", "--shard-text-mb", "0.05", "-j", "0", "--no-progress"]) == 0
    torch.manual_seed(0)
    save_autoencoder(Autoencoder(tiny_ae_config()), d / "ae")
    assert main(["encode", str(d / "tok"), "--ae", str(d / "ae"), "-o", str(d / "lat"), "--dtype", "int8",
                 "--device", "cpu", "--no-progress"]) == 0
    return d


def test_inspect_tokens(pipeline, capsys):
    assert main(["inspect", str(pipeline / "tok"), "--samples", "2", "--chars", "80"]) == 0
    out = capsys.readouterr().out
    assert "tokens shards, layout lm: K=4, L=16, 64 tokens per sample" in out
    assert "bytes per token:" in out and "zstd compression" in out and "text bytes per token" in out
    assert "--- sample 1" in out and "tokenizer demo" in out
    import pydoc_data.topics as topics

    first = topics.topics[sorted(topics.topics)[0]]
    assert repr(first[:30])[1:-1] in out  # decoded back to the original text


def test_inspect_latents_decodes_through_the_autoencoder(pipeline, capsys):
    assert main(["inspect", str(pipeline / "lat"), "--samples", "1", "--ae", str(pipeline / "ae")]) == 0
    out = capsys.readouterr().out
    assert "latents: d=16, int8" in out and "AE reconstruction from stored mu:" in out
    assert "decoded from latents:" in out and "bytes per token:" in out


def test_verify_exit_codes(pipeline, capsys, tmp_path):
    import shutil

    assert main(["verify", str(pipeline / "lat")]) == 0
    copy = tmp_path / "lat"
    shutil.copytree(pipeline / "lat", copy)
    victim = sorted(copy.glob("latents-*.arrow"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {victim.name}" in out and "1 damaged shard(s)" in out
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_console_script():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ("tokenize", "encode", "inspect", "verify"))
