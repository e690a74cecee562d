"""Release export/import (calm_pretrain.release): round trips compared on outputs, the documented
reference layout (docs/release.md, 'The published layout': config.json keys, parameter names, the parameter-count
formula),
HF Llama compatibility of the Transformer baseline, pytorch_model.bin directories, refusal of untrusted
pickles, error messages and atomic writes."""
import copy
import json
import shutil

import pytest
import torch
import transformers

from calm_pretrain import release
from calm_pretrain.cli import main as cli_main
from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from calm_pretrain.release import (ReleaseError, export_release, export_state_dict, import_release,
                                   import_release_ae, release_info)
from tests.helpers import REPO
from tests.helpers.models import perturbed, tiny_bpe

V = 300  # tiny vocabulary shared by the three models
SMALL = [f"model.vocab_size={V}", "model.hidden_size=32", "model.intermediate_size=48"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ae_cfg = load_config(REPO / "configs/tiny/ae.yaml", SMALL + ["model.latent_dim=16"]).model
    calm_cfg = load_config(REPO / "configs/tiny/calm.yaml", SMALL + [
        "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "model.latent_dim=16",
        "model.head.noise_size=8", "model.head.num_blocks=2"]).model
    tr_cfg = load_config(REPO / "configs/tiny/transformer.yaml", SMALL + [
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2"]).model  # grouped-query attention
    return {"ae": perturbed(build_model(ae_cfg)), "calm": perturbed(build_model(calm_cfg)),
            "transformer": perturbed(build_model(tr_cfg))}


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE with the demo tokenizer's specials, wrapped like the demo tokenizer."""
    return tiny_bpe(["the release layout of the published checkpoints"] * 20, V)


IDS = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(1))


def _ae_outputs(ae):
    with torch.no_grad():
        mu, log_sigma = ae.encode(IDS)
        return mu, log_sigma, ae.decode(mu), ae.reconstruct(IDS)


def _calm_outputs(calm):
    with torch.no_grad():
        h = calm.hidden_states(IDS)
        return h, calm.head.sample(h, 4, generator=torch.Generator().manual_seed(7))


def _equal_all(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# Round trips on outputs
# --------------------------------------------------------------------------------------------
def test_autoencoder_round_trip_gives_identical_outputs(models, tokenizer, tmp_path):
    from data_pipeline.tokenizers import load_tokenizer

    ae = models["ae"]
    export_release(ae, tmp_path / "ae", tokenizer)
    back, cfg = import_release(tmp_path / "ae")
    assert cfg == ae.config and not back.training
    assert back.decoder.lm_head_weight is back.encoder.embed_tokens.weight  # tied again after loading
    assert _equal_all(_ae_outputs(back), _ae_outputs(ae))
    # the tokenizer beside the weights loads back and encodes identically
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "ae" / name).is_file()
    text = "the published release"
    assert load_tokenizer(str(tmp_path / "ae")).encode(text) == tokenizer.encode(text)


def test_calm_round_trip_gives_identical_hidden_states_samples_and_embedded_ae(models, tmp_path):
    calm, ae = models["calm"], models["ae"]
    export_release(calm, tmp_path / "calm", ae_model=ae)
    back, cfg = import_release(tmp_path / "calm")
    assert cfg == calm.config
    got, ref = _calm_outputs(back), _calm_outputs(calm)
    assert _equal_all(got, ref)
    ae_back, ae_cfg = import_release_ae(tmp_path / "calm")  # the ae_model.* copy, config from the sidecar
    assert ae_cfg == ae.config
    with torch.no_grad():
        assert torch.equal(ae_back.decode(got[1]), ae.decode(ref[1]))  # head samples → tokens
    assert _equal_all(_ae_outputs(ae_back), _ae_outputs(ae))


def test_calm_embedded_ae_without_sidecar_is_rebuilt_from_shapes(models, tmp_path):
    """The reference pipeline's CALM directories carry no AE config: shapes give it."""
    export_release(models["calm"], tmp_path / "calm", ae_model=models["ae"])
    (tmp_path / "calm" / release.SIDECAR_NAME).unlink()
    ae_back, ae_cfg = import_release_ae(tmp_path / "calm")
    assert (ae_cfg.k, ae_cfg.latent_dim, ae_cfg.hidden_size, ae_cfg.intermediate_size, ae_cfg.vocab_size) == \
        (4, 16, 32, 48, V)
    assert _equal_all(_ae_outputs(ae_back), _ae_outputs(models["ae"]))
    back, _ = import_release(tmp_path / "calm")  # the reference config.json alone suffices for CALM itself
    assert _equal_all(_calm_outputs(back), _calm_outputs(models["calm"]))


def test_transformer_round_trip_and_hf_llama_loads_the_release(models, tmp_path):
    tr = models["transformer"]
    export_release(tr, tmp_path / "tr")
    back, cfg = import_release(tmp_path / "tr")
    assert cfg == tr.config
    with torch.no_grad():
        ref = tr.logits(IDS)
        assert torch.equal(back.logits(IDS), ref)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "tr"), attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=IDS).logits
    torch.testing.assert_close(hf_logits, ref, atol=2e-5, rtol=1e-4)  # an independent implementation
    # and an HF-saved Llama directory imports into our model
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, _ = import_release(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(ours.logits(IDS), ref)


def test_a_transformers_llama_checkpoint_imports(tmp_path):
    """Written by the installed transformers itself: its own key conventions (rope_parameters in 5.x, no pad
    token, a tied output embedding stored once)."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                      tie_word_embeddings=True, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    hf = perturbed(transformers.LlamaForCausalLM(hf_cfg))
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, cfg = import_release(tmp_path / "hf")
    assert (cfg.rope_theta, cfg.pad_token_id, cfg.num_kv_heads) == (500000.0, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(IDS), hf(input_ids=IDS).logits, atol=2e-5, rtol=1e-4)


def test_calm_backbone_config_means_the_same_to_hf_llama(models, tmp_path):
    """The CALM config.json's Llama keys, read by HF's own LlamaModel (the reference backbone), with the
    release's transformer.* tensors, give our hidden states."""
    calm = models["calm"]
    export_release(calm, tmp_path / "calm")
    values = json.loads((tmp_path / "calm" / "config.json").read_text())
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in values.items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaModel(hf_cfg).eval()
    tensors, _ = release.read_release_tensors(tmp_path / "calm")
    missing, unexpected = hf.load_state_dict(
        {k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    with torch.no_grad():
        x = calm.embed_chunks(IDS)
        torch.testing.assert_close(hf(inputs_embeds=x).last_hidden_state, calm.transformer(x), atol=2e-5, rtol=1e-4)


def test_config_fields_beyond_the_reference_survive_and_config_json_wins(models, tmp_path):
    ae = models["ae"]
    ae.config.latent_dropout, ae.config.kl_weight = 0.05, 0.01  # the reference has one ae_dropout for both
    try:
        export_release(ae, tmp_path / "ae")
    finally:
        ae.config.latent_dropout, ae.config.kl_weight = 0.15, 1e-3
    _, cfg = import_release(tmp_path / "ae")
    assert (cfg.token_mask_prob, cfg.latent_dropout, cfg.kl_weight) == (0.15, 0.05, 0.01)
    path = tmp_path / "ae" / "config.json"
    values = json.loads(path.read_text())
    values["eos_token_id"] = 5
    path.write_text(json.dumps(values))
    # An edit after export is refused by name (tests/test_hostile_releases_data.py); without the
    # fingerprint record (a published or hand-made directory) config.json wins over the sidecar.
    with pytest.raises(ReleaseError, match="config.json eos_token_id: 2 -> 5"):
        import_release(tmp_path / "ae")
    side = tmp_path / "ae" / release.SIDECAR_NAME
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "fingerprint"}))
    with pytest.warns(release.ReleaseWarning, match="unverified"):
        assert import_release(tmp_path / "ae")[1].eos_token_id == 5
    import warnings

    with warnings.catch_warnings(record=True) as again:  # said once per release and process
        warnings.simplefilter("always")
        import_release(tmp_path / "ae")
    assert not [w for w in again if issubclass(w.category, release.ReleaseWarning)]


def test_calm_with_a_non_energy_head_round_trips_through_the_sidecar(models, tmp_path):
    from calm_pretrain.models.calm.heads import HEADS

    assert "mse" in HEADS, sorted(HEADS)  # registered in calm_pretrain/models/heads.py
    cfg = load_config(REPO / "configs/tiny/calm.yaml", SMALL + [
        "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", "model.latent_dim=16",
        "model.head.type=mse", "model.head.num_blocks=1"]).model
    calm = perturbed(build_model(cfg))
    export_release(calm, tmp_path / "calm")
    values = json.loads((tmp_path / "calm" / "config.json").read_text())
    assert values["architectures"] == ["CALM"]  # not claimed to be the reference's EnergyTransformer
    back, got = import_release(tmp_path / "calm")
    assert got == cfg and _equal_all(_calm_outputs(back), _calm_outputs(calm))
    (tmp_path / "calm" / release.SIDECAR_NAME).unlink()
    with pytest.raises(ReleaseError, match="needs the head type from calm_pretrain.json"):
        import_release(tmp_path / "calm")


def test_bf16_export_keeps_dtype(models, tmp_path):
    export_release(models["transformer"], tmp_path / "tr", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "tr" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back, _ = import_release(tmp_path / "tr")
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, models["transformer"].lm_head.weight.to(torch.bfloat16))


def test_sharded_safetensors_round_trip(models, tmp_path):
    calm = models["calm"]
    export_release(calm, tmp_path / "calm", ae_model=models["ae"], max_shard_bytes=100_000)
    index = json.loads((tmp_path / "calm" / release.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "calm" / release.SAFE_WEIGHTS).exists()
    back, _ = import_release(tmp_path / "calm")
    assert _equal_all(_calm_outputs(back), _calm_outputs(calm))


def test_native_ae_directory_of_the_data_pipeline_imports(models, tmp_path):
    from calm_pretrain.release.autoencoder import save_autoencoder

    save_autoencoder(models["ae"], tmp_path / "ae")
    back, cfg = import_release(tmp_path / "ae")
    assert cfg == models["ae"].config and _equal_all(_ae_outputs(back), _ae_outputs(models["ae"]))


# --------------------------------------------------------------------------------------------
# The documented reference layout (docs/release.md, 'The published layout'), written out here independently of the code
# --------------------------------------------------------------------------------------------
# docs/release.md, 'Autoencoder config.json': its 23 keys.
AE_CONFIG_KEYS = {
    "architectures", "ae_dropout", "kl_clamp", "kl_weight", "patch_size", "latent_size", "hidden_size",
    "intermediate_size", "num_encoder_layers", "num_decoder_layers", "vocab_size", "hidden_act", "mlp_bias",
    "pretraining_tp", "rms_norm_eps", "initializer_range", "max_position_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "torch_dtype", "transformers_version",
}
# docs/release.md, 'CALM config.json': its 31 keys.
CALM_CONFIG_KEYS = {
    "architectures", "ae_path", "patch_size", "latent_size", "noise_size", "num_mlp_layers", "num_samples", "beta",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "attention_bias", "attention_dropout", "mlp_bias", "pretraining_tp", "use_cache", "pad_token_id",
    "eos_token_id", "bos_token_id", "initializer_range", "tie_word_embeddings", "torch_dtype",
    "transformers_version",
}


def reference_ae_shapes(v, h, i, latent, k, enc=2, dec=2):
    """docs/release.md, 'Autoencoder parameter names', generated from the table."""
    s = {"encoder.embed_tokens.weight": (v, h), "encoder.squeeze_layer.weight": (h, k * h),
         "encoder.squeeze_layer.bias": (h,), "encoder.norm.weight": (h,),
         "encoder.hidden_to_latent.weight": (2 * latent, h), "encoder.hidden_to_latent.bias": (2 * latent,),
         "decoder.latent_to_hidden.weight": (h, latent), "decoder.latent_to_hidden.bias": (h,),
         "decoder.expand_layer.weight": (k * h, h), "decoder.expand_layer.bias": (k * h,),
         "decoder.norm.weight": (h,), "decoder.lm_head_weight": (v, h)}
    for side, n in (("encoder.encoder_layers", enc), ("decoder.decoder_layers", dec)):
        for j in range(n):
            s.update({f"{side}.{j}.layernorm.weight": (h,), f"{side}.{j}.mlp.gate_proj.weight": (i, h),
                      f"{side}.{j}.mlp.up_proj.weight": (i, h), f"{side}.{j}.mlp.down_proj.weight": (h, i)})
    return s


def reference_calm_shapes(v, h, i, layers, heads, kv_heads, k, latent, noise, m):
    """docs/release.md, 'CALM parameter names', without ae_model.*, generated from the table (head_dim = H / heads)."""
    hd = h // heads
    s = {"transformer.embed_tokens.weight": (v, h), "transformer.norm.weight": (h,)}
    for n in range(layers):
        p = f"transformer.layers.{n}."
        s.update({p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv_heads * hd, h),
                  p + "self_attn.v_proj.weight": (kv_heads * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    head = {"noise_embd.weight": (h, noise), "noise_embd.bias": (h,), "hidden_embd.weight": (h, h),
            "hidden_embd.bias": (h,), "norm_hidden.weight": (h,), "norm_hidden.bias": (h,),
            "norm_noise.weight": (h,), "norm_noise.bias": (h,),
            "final_layer.in_ln.weight": (h,), "final_layer.in_ln.bias": (h,),
            "final_layer.linears.0.weight": (h, h), "final_layer.linears.0.bias": (h,),
            "final_layer.linears.2.weight": (latent, h), "final_layer.linears.2.bias": (latent,)}
    for j in range(m):
        p = f"mlp_blocks.{j}."
        head.update({p + "in_ln.weight": (h,), p + "in_ln.bias": (h,), p + "linears.0.weight": (h, 2 * h),
                     p + "linears.0.bias": (h,), p + "linears.2.weight": (h, h), p + "linears.2.bias": (h,),
                     p + "linears.4.weight": (2 * h, h), p + "linears.4.bias": (2 * h,),
                     p + "down_proj.weight": (h, h), p + "down_proj.bias": (h,)})
    for prefix in ("mlp_generator.", "generative_head."):
        s.update({prefix + n: shape for n, shape in head.items()})
    s.update({"embed_proj.0.weight": (2 * h, k * h), "embed_proj.0.bias": (2 * h,),
              "embed_proj.2.weight": (h, 2 * h), "embed_proj.2.bias": (h,),
              "embed_proj.3.weight": (h,), "embed_proj.3.bias": (h,)})
    return s


def spec_calm_params(v, h, i, layers, k, m, noise, latent):
    """docs/release.md, 'Parameter count': the closed form (MHA, without the AE)."""
    return (v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h + (2 * k + 2) * h * h + 5 * h
            + (2 + 6 * m) * h * h + (noise + 9 + 7 * m) * h + latent * (h + 1))


def test_ae_release_has_exactly_the_documented_config_keys_and_tensors(models, tmp_path):
    export_release(models["ae"], tmp_path / "ae")
    values = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert set(values) == AE_CONFIG_KEYS
    assert "model_type" not in values and "auto_map" not in values
    tensors, _ = release.read_release_tensors(tmp_path / "ae")
    assert {k: tuple(t.shape) for k, t in tensors.items()} == reference_ae_shapes(V, 32, 48, 16, 4)
    assert len(tensors) == 28
    # both tied names, as separate tensors with identical values (docs/release.md, 'The tied AE embedding':
    # dropping one breaks the reference)
    assert torch.equal(tensors["encoder.embed_tokens.weight"], tensors["decoder.lm_head_weight"])
    # the published AE's values (docs/release.md, 'Autoencoder config.json') from configs/ae/ae_k4_d128.yaml
    published = release.release_config(load_config(REPO / "configs/ae/ae_k4_d128.yaml").model)
    assert published == {
        "architectures": ["Autoencoder"], "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 0.001, "patch_size": 4,
        "latent_size": 128, "hidden_size": 512, "intermediate_size": 1280, "num_encoder_layers": 2,
        "num_decoder_layers": 2, "vocab_size": 128257, "hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "initializer_range": 0.02, "max_position_embeddings": 2048, "bos_token_id": 128000,
        "eos_token_id": 128001, "pad_token_id": 128256, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.43.0"}


def test_calm_release_has_the_documented_names_shapes_count_and_config(models, tmp_path):
    calm = models["calm"]
    export_release(calm, tmp_path / "calm", ae_model=models["ae"])
    tensors, _ = release.read_release_tensors(tmp_path / "calm")
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    expected = reference_calm_shapes(V, 32, 48, layers=2, heads=2, kv_heads=2, k=4, latent=16, noise=8, m=2)
    expected.update({"ae_model." + k: s for k, s in reference_ae_shapes(V, 32, 48, 16, 4).items()})
    assert shapes == expected
    unique = sum(t.numel() for k, t in tensors.items() if not k.startswith(("ae_model.", "generative_head.")))
    assert unique == spec_calm_params(V, 32, 48, 2, k=4, m=2, noise=8, latent=16)
    for k, t in tensors.items():  # the alias holds the same values
        if k.startswith("generative_head."):
            assert torch.equal(t, tensors["mlp_generator." + k[len("generative_head."):]])
    values = json.loads((tmp_path / "calm" / "config.json").read_text())
    assert set(values) == CALM_CONFIG_KEYS and values["architectures"] == ["EnergyTransformer"]
    gen = json.loads((tmp_path / "calm" / release.GENERATION_CONFIG).read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    # CALM-M's values (docs/release.md, 'CALM config.json') from configs/calm/calm_m.yaml
    m = release.release_config(load_config(REPO / "configs/calm/calm_m.yaml").model)
    assert {k: m[k] for k in ("patch_size", "latent_size", "noise_size", "num_mlp_layers", "num_samples", "beta",
                              "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                              "max_position_embeddings", "pad_token_id", "eos_token_id", "bos_token_id")} == {
        "patch_size": 4, "latent_size": 128, "noise_size": 64, "num_mlp_layers": 4, "num_samples": 8, "beta": 1.0,
        "vocab_size": 128257, "hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "pad_token_id": 128256, "eos_token_id": 128001, "bos_token_id": 128000}
    assert spec_calm_params(128257, 1024, 2752, 16, k=4, m=4, noise=64, latent=128) == 371_732_608


# --------------------------------------------------------------------------------------------
# The reference pipeline's pytorch_model.bin, and untrusted pickles
# --------------------------------------------------------------------------------------------
def _as_reference_bin(src, dst, shards=1):
    """Turn an export into what the reference pipeline writes: config.json + pytorch_model.bin (the head
    alias and the AE tie sharing storage, as torch.save stores them), optionally sharded."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors, _ = release.read_release_tensors(src)
    for k in list(tensors):  # re-create the reference's shared storage
        if k.startswith("generative_head."):
            tensors[k] = tensors["mlp_generator." + k[len("generative_head."):]]
        if k.endswith("decoder.lm_head_weight"):
            tensors[k] = tensors[k.replace("decoder.lm_head_weight", "encoder.embed_tokens.weight")]
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = names[s::shards]
        torch.save({k: tensors[k] for k in part}, dst / fname)
        weight_map.update({k: fname for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 2])
def test_reference_pytorch_model_bin_directories_import(models, tmp_path, shards):
    export_release(models["calm"], tmp_path / "calm", ae_model=models["ae"])
    _as_reference_bin(tmp_path / "calm", tmp_path / "ref_calm", shards)
    back, _ = import_release(tmp_path / "ref_calm")
    assert _equal_all(_calm_outputs(back), _calm_outputs(models["calm"]))
    ae_back, _ = import_release_ae(tmp_path / "ref_calm")
    assert _equal_all(_ae_outputs(ae_back), _ae_outputs(models["ae"]))
    export_release(models["ae"], tmp_path / "ae")
    _as_reference_bin(tmp_path / "ae", tmp_path / "ref_ae", shards)
    ae_back, _ = import_release(tmp_path / "ref_ae")
    assert _equal_all(_ae_outputs(ae_back), _ae_outputs(models["ae"]))
    assert release_info(tmp_path / "ref_calm")["consistent"]


CALLS = []


def record_call(*args):
    CALLS.append(args)
    return "executed"


class Payload:
    """Unpickling this would call record_call: a stand-in for arbitrary code in a hostile pickle."""

    def __reduce__(self):
        return record_call, ("pwned",)


def test_pickle_with_an_arbitrary_object_is_refused_without_running_it(models, tmp_path):
    export_release(models["ae"], tmp_path / "ae")
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tmp_path / "ae" / "config.json", d / "config.json")
    tensors, _ = release.read_release_tensors(tmp_path / "ae")
    torch.save({**tensors, "payload": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(ReleaseError, match=r"pytorch_model\.bin: refusing to load"):
        import_release(d)
    assert CALLS == []


# --------------------------------------------------------------------------------------------
# Errors name the file
# --------------------------------------------------------------------------------------------
def test_missing_config_json_and_unknown_architecture(models, tmp_path):
    export_release(models["ae"], tmp_path / "ae")
    path = tmp_path / "ae" / "config.json"
    values = json.loads(path.read_text())
    values["architectures"] = ["MixtralForCausalLM"]
    path.write_text(json.dumps(values))
    with pytest.raises(ReleaseError, match=r"config\.json: unknown architecture 'MixtralForCausalLM'"):
        import_release(tmp_path / "ae")
    path.unlink()
    with pytest.raises(ReleaseError, match=r"ae/config\.json: missing"):
        import_release(tmp_path / "ae")
    with pytest.raises(ReleaseError, match="no such release directory"):
        import_release(tmp_path / "nowhere")


def _rewrite_weights(d, edit):
    from safetensors.torch import save_file

    tensors, _ = release.read_release_tensors(d)
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_listed(models, tmp_path):
    export_release(models["calm"], tmp_path / "calm")
    _rewrite_weights(tmp_path / "calm", lambda t: t.pop("transformer.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ReleaseError, match=r"model\.safetensors: missing 1 tensor\(s\): "
                                           r"transformer\.layers\.1\.mlp\.up_proj\.weight"):
        import_release(tmp_path / "calm")
    export_release(models["transformer"], tmp_path / "tr")
    _rewrite_weights(tmp_path / "tr", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ReleaseError, match=r"model\.safetensors: unexpected 1 tensor\(s\): model\.extra\.weight"):
        import_release(tmp_path / "tr")


def test_shape_mismatch_names_tensor_and_shapes(models, tmp_path):
    export_release(models["transformer"], tmp_path / "tr")
    path = tmp_path / "tr" / "config.json"
    values = json.loads(path.read_text())
    values["vocab_size"] = V + 4
    path.write_text(json.dumps(values))
    with pytest.raises(ReleaseError, match=rf"model\.safetensors: shape mismatch in 2 tensor\(s\): "
                                           rf"model\.embed_tokens\.weight \({V}, 32\) \(expected \({V + 4}, 32\)\), "
                                           rf"lm_head\.weight \({V}, 32\)"):
        import_release(tmp_path / "tr")


def test_differing_tied_or_aliased_tensors_are_refused(models, tmp_path):
    export_release(models["calm"], tmp_path / "calm", ae_model=models["ae"])

    def corrupt(t):
        t["generative_head.noise_embd.bias"] = t["generative_head.noise_embd.bias"] + 1

    _rewrite_weights(tmp_path / "calm", corrupt)
    with pytest.raises(ReleaseError, match="mlp_generator.noise_embd.bias and generative_head.noise_embd.bias differ"):
        import_release(tmp_path / "calm")


def test_export_state_dict_validates_against_the_config(models, tmp_path):
    calm = models["calm"]
    state = dict(calm.state_dict())
    state.pop("embed_proj.3.bias")
    with pytest.raises(ReleaseError, match=r"missing 1 tensor\(s\): embed_proj\.3\.bias"):
        export_state_dict(state, calm.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a consolidated state dict may hold only one of the AE's tied names
    ae_state = {k: v for k, v in models["ae"].state_dict().items() if k != "decoder.lm_head_weight"}
    export_state_dict(ae_state, models["ae"].config, tmp_path / "ae")
    back, _ = import_release(tmp_path / "ae")
    assert _equal_all(_ae_outputs(back), _ae_outputs(models["ae"]))


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def test_a_crash_mid_export_leaves_no_target_and_keeps_the_previous_release(models, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    target = tmp_path / "release"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", boom)
        with pytest.raises(OSError, match="simulated"):
            export_release(models["ae"], target)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory

    export_release(models["ae"], target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    retrained = perturbed(copy.deepcopy(models["ae"]))  # the same model, other weights
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", boom)
        with pytest.raises(OSError, match="simulated"):
            export_release(retrained, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["release"]
    back, _ = import_release(target)
    assert _equal_all(_ae_outputs(back), _ae_outputs(models["ae"]))
    # a successful re-export replaces it (a release of another model is never replaced:
    # tests/test_hostile_releases_data.py)
    export_release(retrained, target, overwrite=True)
    assert _equal_all(_ae_outputs(import_release(target)[0]), _ae_outputs(retrained))
    assert [p.name for p in tmp_path.iterdir()] == ["release"]


def test_export_never_replaces_a_directory_that_is_not_a_release(models, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ReleaseError, match="refusing to replace"):
        export_release(models["ae"], tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# release-info
# --------------------------------------------------------------------------------------------
def test_release_info_and_cli(models, tmp_path, capsys):
    from calm_pretrain.models import count_parameters

    calm = models["calm"]
    export_release(calm, tmp_path / "calm", ae_model=models["ae"])
    info = release_info(tmp_path / "calm")
    assert info["architecture"] == "EnergyTransformer" and info["consistent"]
    assert info["parameters"]["total"] == count_parameters(calm)["total"]
    assert info["embedded_ae_parameters"] == count_parameters(models["ae"])["total"]
    assert cli_main(["release-info", str(tmp_path / "calm")]) == 0
    out = capsys.readouterr().out
    assert "EnergyTransformer" in out and f"{count_parameters(calm)['total']:,}" in out and "num_mlp_layers" in out
    assert cli_main(["release-info", "--json", str(tmp_path / "calm")]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == count_parameters(calm)["total"]
    assert cli_main(["release-info", str(tmp_path / "missing")]) == 2
    assert "no such release directory" in capsys.readouterr().err


def test_an_exported_autoencoder_release_loads_for_encoding_with_the_same_fingerprint(tmp_path):
    from calm_pretrain.release import export_release
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.ae_io import autoencoder_fingerprint
    from tests.helpers.models import tiny_ae_config

    torch.manual_seed(0)
    ae = build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval()
    export_release(ae, tmp_path / "release")
    loaded = load_autoencoder(tmp_path / "release")
    assert autoencoder_fingerprint(loaded) == autoencoder_fingerprint(ae)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
