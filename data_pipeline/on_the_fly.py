"""``data.latents: on_the_fly``: CALM trains on token shards, and the frozen autoencoder encodes each
micro-batch inside the training step instead of ahead of time (``calm-data encode``).

Token shards cost about 1.3 bytes per token; latent shards 51–81 (docs/performance.md, 'Latents:
stored or on the fly'). The price is the AE encoder's forward pass in every step: batched, under
``torch.no_grad``, on the engine's device, in bf16 autocast on CUDA exactly as ``calm-data encode``
runs it (:func:`data_pipeline.encode.encode_posterior`), and kept in float32 (no storage rounding).

:class:`OnTheFlyLatents` is the batch transform the run builds (calm_pretrain/train_command.py) and the
trainer applies to every loader micro-batch before the architecture's loss: ``ids`` in, the same batch
with ``mu`` and ``log_sigma`` [b, L, d] out, the shapes latent shards would give. The AE stays outside
the trained model: it has no gradients, is in no optimizer and in no checkpoint. Its fingerprint goes
into the trainer state, and a resume with another autoencoder is refused (:meth:`check_resume`), as a
latent shard's recorded fingerprint is checked in ``stored`` mode.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from data_pipeline.ae_io import autoencoder_fingerprint
from data_pipeline.encode import check_ae_matches_tokens, encode_posterior
from data_pipeline.errors import IncompatibleDataError
from data_pipeline.manifest import Manifest

MODE = "on_the_fly"


class OnTheFlyLatents:
    """The frozen autoencoder `ae` (loaded from `where`) as a batch transform on `device`, for a model
    of K = `k` and latent size `latent_dim`; refuses an AE of another K or latent size, naming `where`."""

    def __init__(self, ae: torch.nn.Module, device: torch.device | str, *, k: int, latent_dim: int, where: str):
        cfg = ae.config
        for what, run, mine in (("K (tokens per chunk)", k, cfg.k), ("latent dim d", latent_dim, cfg.latent_dim)):
            if int(run) != int(mine):
                raise IncompatibleDataError(
                    f"{where}: the autoencoder has {what} = {mine} but the run's model has {what} = {run}; "
                    f"data.latents = {MODE} needs the autoencoder the model is meant for (model.ae_path)")
        self.where = str(where)
        self.device = torch.device(device)
        self.fingerprint = autoencoder_fingerprint(ae)  # before the move: the hash reads the weights on the CPU
        self.ae = ae.to(self.device).eval().requires_grad_(False)

    def check_tokens(self, manifests: Iterable[Manifest]) -> None:
        """The token shards fit the AE (sample length a multiple of its K, its vocabulary and specials),
        as ``calm-data encode`` checks them; the error names the manifest."""
        for m in manifests:
            check_ae_matches_tokens(self.ae, m)

    def __call__(self, batch: dict) -> dict:
        """A loader batch of token ids → the batch on the device with the posterior of every chunk."""
        if self.ae.training:  # a caller's .train() on a module holding it must not turn on its masking
            self.ae.eval()
        ids = batch["ids"].to(self.device, non_blocking=True)
        mu, log_sigma = encode_posterior(self.ae, ids)
        return {**batch, "ids": ids, "mu": mu, "log_sigma": log_sigma}

    # ---- what the trainer records --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"latents": MODE, "ae_fingerprint": self.fingerprint, "ae_path": self.where}

    def data_sources(self, sources: Optional[dict]) -> dict:
        """The loader's record of the shards' makers (tokenizer), with the autoencoder of the latents:
        export checks an embedded AE against it as it does for latent shards."""
        return {**(sources or {}), "latents": MODE, "ae_fingerprint": self.fingerprint,
                "latent_dim": int(self.ae.config.latent_dim)}

    def check_resume(self, saved: Optional[dict], source: str) -> None:
        """Refuse a checkpoint not trained on this autoencoder's on-the-fly latents."""
        if not saved or saved.get("latents") != MODE:
            raise IncompatibleDataError(
                f"{source}: was not trained with data.latents = {MODE} (it records no autoencoder run in the "
                f"step); resume it with the data.latents and data.train it was trained with")
        if saved.get("ae_fingerprint") != self.fingerprint:
            raise IncompatibleDataError(
                f"{source}: was trained on the latents of autoencoder {saved.get('ae_fingerprint')} (model.ae_path "
                f"{saved.get('ae_path')}); model.ae_path {self.where} is autoencoder {self.fingerprint}: refusing to "
                f"resume on another autoencoder's latents (set model.ae_path to the one it was trained with)")
