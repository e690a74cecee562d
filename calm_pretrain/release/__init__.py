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

Each architecture's release adapter (``spec_of(cfg).release``, in ``calm_pretrain/models/<arch>/release.py``)
says how it is published: its architecture name(s), the config.json mapping and its parameter names.
The autoencoder and CALM modules already use the release names; CALM additionally writes the reference's
alias ``generative_head.*`` of the head and, optionally, the frozen AE under ``ae_model.*``. The
Transformer baseline maps ``transformer.*`` → ``model.*`` (HF ``LlamaForCausalLM``); ``lm_head.weight``
keeps its name. The code here finds the adapter and does the rest, for every architecture alike.

Modules: ``calm_pretrain/models/release_layout.py`` (file names, constants, errors, the adapters'
base: a leaf beside the adapters, which import it; its names are re-exported here), ``adapters`` (finding an adapter, the generic config.json part), ``names`` (parameter names,
tensor checks), ``files`` (reading), ``directory`` (atomic writes), ``export``, ``load`` (import,
release-info). The package imports its modules when a name is first asked for.
"""
import importlib

_EXPORTS = {
    "calm_pretrain.models.release_layout": ("BIN_INDEX", "BIN_WEIGHTS", "CONFIG_NAME", "GENERATION_CONFIG", "SAFE_INDEX", "SAFE_WEIGHTS",
               "SIDECAR_NAME", "SIDECAR_VERSION", "TRANSFORMERS_VERSION", "ReleaseAdapter", "ReleaseError",
               "ReleaseWarning"),
    "adapters": ("architecture_of", "model_config_from_release", "release_adapters", "release_config"),
    "names": ("check_tensors", "expected_shapes", "release_state", "split_release_state"),
    "files": ("read_release_tensors", "weight_files"),
    "export": ("export_release", "export_state_dict", "save_tokenizer_files"),
    "load": ("import_release", "import_release_ae", "release_info"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        module = _MODULE_OF[name]
        value = getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")  # a submodule: calm_pretrain.release.files
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))
