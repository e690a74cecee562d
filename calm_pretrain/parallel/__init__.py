"""Parallelism applied to a finished model: the engines (plain PyTorch, DeepSpeed ZeRO, DeepSpeed's
pipeline), megatron-core tensor parallelism (`tensor`, its CPU shims in `mcore_shim`), the process
groups of a TP × PP × DP layout (`groups`), activation checkpointing and ZeRO-3 leaves (`plan`).

The models know nothing of this package; it imports config and models (each architecture's pipeline
stages and blocks come from its spec), never the trainer, release or the workflows."""
