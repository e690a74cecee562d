"""Training: the loop (`trainer`: one step function, callbacks, metrics), checkpoints that resume
bit-exactly at any layout (`checkpoint`; files are read through calm_pretrain/safe_load.py),
preemption (`signals`), divergence handling and the LR schedule. The entry point of a run
(`calm-pretrain train`) is calm_pretrain/train_command.py, above this package.

Owns the training loop and its files; imports config, models (through the registry), parallel, the
numerics and the io module; never eval, release, the data loader or the workflows."""
