"""The exceptions of the data pipeline. Every message names the file it is about."""
from __future__ import annotations


class DataError(ValueError):
    """Base class: something is wrong with data on disk or with how it is used."""


class InputError(DataError):
    """Raw input that cannot be read as documents (missing text field, broken stream, unknown format)."""


class ShardError(DataError):
    """A shard file that is missing, truncated, corrupted or of an unexpected format."""


class ManifestError(DataError):
    """A manifest that is missing, unreadable, incomplete or inconsistent with the files beside it."""


class IncompatibleDataError(DataError):
    """Shards made for another configuration (K, latent dim, autoencoder or tokenizer) than the run's."""
