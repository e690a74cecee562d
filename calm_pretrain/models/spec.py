"""What an architecture tells the rest of the project about itself: one :class:`ModelSpec` per
architecture package, collected by calm_pretrain/models/registry.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class ModelSpec:
    arch: str                        # the config's `model.arch`
    config: type                     # the model section's dataclass (validate, validate_parallel)
    model: type                      # the nn.Module, built as model(config)
    components: tuple                # (parameter-name prefix, component name): first match counts
    loss: Callable                   # (forward, loader batch) -> (loss, {name: float to log})
    data: Callable                   # (model config, seq_chunks) -> what its shards' manifests must say
    example_batch: Callable          # (config, batch size, seq_chunks, generator) -> a loader batch of random data
    evaluate: Callable               # (model, blocks, ae=, seed=, draws=) -> held-out scores
    training_flops: Callable         # (config, context, ae config or None) -> {component: FLOPs/token}
    inference_flops: Optional[Callable] = None   # the same per generated token; None: does not generate
    generate: Optional[Callable] = None          # (model, ae, prompt ids, new tokens, T, **sampler options) -> ids
    published_block_tokens: int = 2048           # the evaluation block of the published scores
    max_temperature: Optional[float] = None      # its sampler's largest temperature (None: any)
    uses_autoencoder: bool = False   # trains on a frozen AE's latents; is scored and sampled through it
    encodes_latents: bool = False    # is an autoencoder: encodes token chunks for other models
    pipeline_layers: Optional[Callable] = None   # model -> (stage modules, DeepSpeed loss_fn or None)
    pipeline_batch: Optional[Callable] = None    # (config, loader batch) -> (first-stage inputs, labels)
    checkpoint_blocks: tuple = ()    # module classes whose activations are recomputed in backward
    zero3_leaves: tuple = ()         # module classes ZeRO-3 must gather whole (they read a child's weights)
    compile_blocks: Optional[tuple] = None  # module classes train.compile compiles one by one (None: checkpoint_blocks)
    release: Any = None              # its release adapter (a calm_pretrain.models.release_layout.ReleaseAdapter), or None
    label: str = ""                  # short display name in plots and sweep groups ("CALM"); "": the arch

    @property
    def display_name(self) -> str:
        return self.label or self.arch
