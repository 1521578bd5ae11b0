"""training: loss, learning rate, sampling, augmentation, a short run whose checkpoint the engine loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flarebox.errors import ConfigError
from flarebox.training.augment import spatial
from flarebox.training.config import load_train_config
from flarebox.training.data import Sample
from flarebox.training.loss import deep_supervision_loss, dice_ce
from flarebox.training.sampling import foreground_index, sample_batch
from flarebox.training.trainer import poly_lr


def test_dice_ce_on_hand_cases():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 40 - 20
    assert dice_ce(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 2, 4, 4, 4)
    # CE = ln 2; soft Dice of p = 0.5 everywhere against half the voxels: 2*16/(32+32) = 0.5
    assert dice_ce(uniform, target).item() == pytest.approx(np.log(2) + 0.5, rel=1e-4)


def test_partial_labels_merge_unlabelled_classes_into_background():
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[:, 2] = 20  # confident in class 2, which this dataset does not annotate
    full = dice_ce(logits, target)
    partial = dice_ce(logits, target, labelled=(1,))
    assert partial.item() < 0.01 < full.item()  # class 2 may hide in background: no penalty


def test_deep_supervision_weights_drop_the_lowest_resolution():
    target = torch.randint(0, 2, (1, 8, 8, 8))
    lowest = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    outputs = [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4), lowest]
    loss = deep_supervision_loss(outputs, target)
    loss.backward()
    assert lowest.grad is not None and torch.count_nonzero(lowest.grad) == 0  # weight 0, still in the graph


def test_poly_learning_rate_and_config_validation(tmp_path):
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    path = tmp_path / "train.toml"
    path.write_text("[train]\nbatch_size = 4\nlabelled_classes = [1]\npatch_zyx = [16, 32, 32]\n")
    config = load_train_config(path, epochs=3)
    assert config.batch_size == 4 and config.labelled_classes == (1,) and config.epochs == 3
    assert config.patch_zyx == (16, 32, 32)
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(path, lerning_rate=1)


def test_foreground_oversampling_rate():
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[30:33, 30:33, 30:33] = 1  # a small organ in a corner
    samples = [Sample("a", np.zeros((1, 40, 40, 40), np.float32), labels)]
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(200):
        _, batch = sample_batch(samples, foreground_index(samples), 3, (8, 8, 8), rng, 0.33)
        hits.append([bool(b.any()) for b in batch])
    hits = np.array(hits)
    assert hits[:, -1].all()  # the forced patch always holds foreground
    assert hits[:, 0].mean() < 0.2  # random patches rarely do


def test_spatial_augmentation_keeps_image_and_labels_aligned():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(8, 16, 32, 32, dtype=torch.long)
    labels[:, 4:12, 8:20, 10:26] = 1
    images = labels[:, None].float() * 5
    for _ in range(5):
        images, labels = spatial(images, labels, gen)
    inside = images[:, 0][labels == 1]
    outside = images[:, 0][labels == 0]
    assert inside.mean() > 4 and outside.mean() < 1


def test_short_training_run_lowers_the_loss_and_the_engine_loads_it(tmp_path):
    from flarebox.models import load_network, load_plan, write_model_folder
    from flarebox.phantoms import write_dataset
    from flarebox.training.config import TrainConfig
    from flarebox.training.trainer import train
    from tests import nnunet_fixtures

    raw = write_dataset(tmp_path / "raw", 3, 0, spacing_zyx_mm=(4.0, 4.0, 4.0))
    model = write_model_folder(tmp_path / "model", **{**nnunet_fixtures.TINY_PLAIN, "spacing_zyx_mm": (4.0, 4.0, 4.0)})
    config = TrainConfig(epochs=6, iterations_per_epoch=3, batch_size=2, validation_cases=1, validate_every=3,
                         learning_rate=0.01, spatial_augmentation=False)
    path = train(raw, model, config)
    state = torch.load(path, weights_only=False)
    assert set(state) >= {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    losses = state["logging"]["train_losses"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert state["logging"]["val_dice"]
    network = load_network(load_plan(model), 0)
    assert network(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 14, 16, 32, 32)
