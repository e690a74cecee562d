"""An autoencoder's fingerprint: a hash of its config and of every weight (name, dtype, shape, bytes), so
two autoencoders with the same fingerprint encode identically. Latent manifests record it; the loader
and its checks compare against it.

Reading and writing autoencoder directories (ours and releases) is calm_pretrain/release/autoencoder.py's:
the data pipeline is a library below the release code, and the commands that load an autoencoder pass
its loader in (run_encode, inspect).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch


def autoencoder_fingerprint(ae) -> str:
    """sha256 over the config and all weights (sorted names), first 16 hex digits."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(ae.config), sort_keys=True).encode())
    for name, t in sorted(ae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
