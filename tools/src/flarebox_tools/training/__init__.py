"""An nnU-Net-like trainer whose checkpoints the engine (and nnU-Net's predictor) load directly.

One path, a module per step: config (frozen TrainConfig / NetworkSpec from TOML) -> plans (a new
model folder's plans.json) -> data (the engine's preprocessing, cached as .npy) -> sampling
(patches, foreground oversampling) -> augment (spatial and intensity, in torch) -> loss (Dice + CE,
deep supervision, partial labels) -> trainer (optimiser, poly LR, DDP via torchrun) -> validate
(engine sliding window, FLARE metrics) -> checkpoint (nnU-Net's keys). `demo` trains the bundled
demo weights on synthetic phantoms. `transfer` is Task 3's six-step pipeline (MRI models from
labelled CT and unlabelled MRI), `transfer_demo` runs it on phantoms for Task 3's demo weights.
"""
