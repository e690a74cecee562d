"""Training: the loop (`trainer`: one step function, callbacks, metrics), checkpoints that resume
bit-exactly at any layout (`checkpoint`, `safe_load`), preemption (`signals`), divergence handling,
the LR schedule and the run entry point (`run`: `calm-pretrain train`, one process per rank).

Owns the training loop and its files; imports config, models (through the registry), parallel,
data_pipeline and eval (for the periodic held-out evaluation); never release or the workflows."""
