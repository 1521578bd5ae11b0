"""An nnU-Net-like trainer whose checkpoints the engine (and nnU-Net's predictor) load directly.

data (preprocess an nnU-Net raw dataset with the engine's own preprocessing) -> sampling (patches,
foreground oversampling) -> augment (spatial and intensity, in torch) -> loss (Dice + CE, deep
supervision, partial labels) -> trainer (SGD poly or AdamW, validation, checkpoints, DDP via torchrun).
"""
