"""Release checkpoints: export to and import from the layout of the published CALM checkpoints.

A release directory holds what the reference modeling code (``shaochenze/calm``) and HF tooling read
(docs/release.md, 'The published layout', documents every key and tensor name):

- ``config.json``: the reference config fields, mapped from our config dataclasses
  (``Autoencoder`` → ``AutoencoderConfig`` keys, ``EnergyTransformer`` → ``CALMConfig`` keys, the
  Transformer baseline → an HF ``LlamaForCausalLM`` config);
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``):
  the weights under the reference parameter names, every tied/aliased name as its own tensor
  (safetensors cannot share storage, and the layout shows that dropping a tied name breaks the reference
  loader silently);
- ``generation_config.json`` (CALM and Llama), the tokenizer files when a tokenizer is given;
- ``calm_pretrain.json``: our full model config(s). The reference ``config.json`` cannot express every
  field of ours (the AE's separate latent dropout, the head's number of target samples, non-energy head
  types, ...), so that file carries them. The reference code ignores it; ``config.json`` stays exactly the
  documented key set and wins for every field it has.

Import reads our own releases, the reference pipeline's output (``pytorch_model.bin``, possibly sharded
with ``pytorch_model.bin.index.json``, loaded with ``torch.load(weights_only=True)``: no untrusted pickle
is ever executed) and HF Llama checkpoints, and checks names and shapes before anything is loaded.

Name mapping (ours → release): the autoencoder and CALM modules already use the release names, so they
map to themselves; CALM additionally writes the reference's alias ``generative_head.*`` of the head and,
optionally, the frozen AE under ``ae_model.*``. The Transformer baseline maps ``transformer.*`` → ``model.*``
(HF ``LlamaForCausalLM``); ``lm_head.weight`` keeps its name.

Modules: ``layout`` (file names, config.json mapping), ``names`` (parameter names, tensor checks), ``files``
(reading), ``directory`` (atomic writes), ``export``, ``load`` (import, release-info).
"""
from calm_pretrain.release.layout import (  # noqa: F401
    AE_PREFIX, AE_TIED, ARCH_AE, ARCH_CALM, ARCH_CALM_OTHER_HEAD, ARCH_LLAMA, BIN_INDEX, BIN_WEIGHTS, CONFIG_NAME,
    GENERATION_CONFIG, HEAD_ALIAS_PREFIX, HEAD_PREFIX, KNOWN_ARCHITECTURES, SAFE_INDEX, SAFE_WEIGHTS, SIDECAR_NAME,
    SIDECAR_VERSION, TRANSFORMERS_VERSION, ReleaseError, ReleaseWarning, architecture_of,
    model_config_from_release, release_config)
from calm_pretrain.release.names import (check_tensors, expected_shapes, from_release_name, release_state,  # noqa: F401
                                         split_release_state, to_release_name)
from calm_pretrain.release.files import read_release_tensors, weight_files  # noqa: F401
from calm_pretrain.release.export import export_release, export_state_dict, save_tokenizer_files  # noqa: F401
from calm_pretrain.release.load import import_release, import_release_ae, release_info  # noqa: F401
