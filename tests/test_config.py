import pytest

from calm_pretrain.config import ConfigError, load_config
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig
from calm_pretrain.models.transformer import TransformerConfig
from calm_pretrain.schema import parse_override
from tests.helpers import REPO


def test_yaml_and_overrides_are_typed():
    cfg = load_config(REPO / "configs/calm/calm_m.yaml", ["model.k=8", "train.lr=1e-4", "model.head.alpha=0.5",
                                                          "train.activation_checkpointing=true"])
    assert isinstance(cfg.model, CALMConfig)
    assert cfg.model.k == 8 and cfg.train.lr == 1e-4 and cfg.model.head.alpha == 0.5
    assert cfg.train.activation_checkpointing is True
    assert isinstance(cfg.train.lr, float)


def test_arch_selects_the_model_section():
    assert isinstance(load_config(REPO / "configs/ae/ae_k4_d128.yaml").model, AutoencoderConfig)
    assert isinstance(load_config(REPO / "configs/transformer/transformer_s.yaml").model, TransformerConfig)
    cfg = load_config(None, ["model.arch=autoencoder", "model.k=2"])
    assert isinstance(cfg.model, AutoencoderConfig) and cfg.model.k == 2


@pytest.mark.parametrize("override, key", [
    ("model.hiden_size=10", "model.hiden_size"),          # unknown key
    ("model.head.colour=red", "model.head.colour"),       # unknown nested key
    ("trian.lr=1", "trian"),                              # unknown section
    ("model.k=four", "model.k"),                          # wrong type
    ("train.lr=abc", "train.lr"),                         # wrong type
    ("train.activation_checkpointing=3", "train.activation_checkpointing"),
    ("model.hidden_size=1000", "model.hidden_size"),      # not divisible by heads
    ("model.num_kv_heads=5", "model.num_kv_heads"),       # GQA groups must divide heads
    ("model.head.type=unicorn", "model.head.type"),
    ("model.head.alpha=2.0", "model.head.alpha"),         # energy score not strictly proper
    ("model.arch=rnn", "model.arch"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("parallel.tensor=3", "parallel.tensor"),             # does not divide 16 heads
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/calm/calm_m.yaml", [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_autoencoder_layers_must_split_in_two():
    with pytest.raises(ConfigError, match="model.num_encoder_layers"):
        load_config(None, ["model.arch=autoencoder", "model.num_encoder_layers=3"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    run_configs = [p for p in paths if p.parent.name in ("ae", "calm", "transformer", "tiny")]
    assert len(run_configs) >= 13
    for p in run_configs:
        load_config(p)
