"""training: loss on hand cases, poly LR, config, sampling, augmentation, cache, and a short real run
whose checkpoint the engine (and nnU-Net's own predictor, where installed) load and predict with."""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from flarebox.errors import ConfigError
from flarebox_tools.training.augment import SpatialSettings, centre_crop, intensity, spatial, spatial_margin
from flarebox_tools.training.config import NetworkSpec, TrainConfig, load_config
from flarebox_tools.training.data import TrainingCase, class_locations, resample_labels, split_cases
from flarebox_tools.training.loss import deep_supervision_loss, deep_supervision_weights, dice_ce
from flarebox_tools.training.sampling import crop, rank_batch_size, sample_batch
from flarebox_tools.training.trainer import cps_loss, cps_ramp, labelled_mask, poly_lr
from tests.conftest import TINY_NETWORK_TOML

ROOT = Path(__file__).resolve().parents[1]
NNUNET_PYTHON = ROOT / ".venv-nnunet" / "bin" / "python"

TINY_NETWORK = NetworkSpec(
    features_per_stage=(4, 8, 16), strides_zyx=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
    kernel_sizes_zyx=((3, 3, 3),) * 3, blocks_per_stage=(1, 1, 1), spacing_zyx_mm=(8.0, 8.0, 8.0),
    patch_zyx=(16, 32, 32), ct_clip_hu=(-958.0, 270.0), ct_mean_hu=-97.3, ct_std_hu=137.8)


# ---- loss ------------------------------------------------------------------------------------------

def half_target() -> torch.Tensor:
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    return target


def test_dice_ce_is_nnunets_ce_minus_soft_dice():
    target = half_target()
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 40 - 20
    assert dice_ce(perfect, target).item() == pytest.approx(-1.0, abs=1e-6)
    # p = 0.5 everywhere: CE = ln 2; Dice of class 1 = 2 * 16 / (32 + 32) = 0.5
    assert dice_ce(torch.zeros(1, 2, 4, 4, 4), target).item() == pytest.approx(math.log(2) - 0.5, rel=1e-5)


def test_batch_dice_pools_the_batch_and_plain_dice_averages_samples():
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # class 1 in the first sample only
    logits = torch.zeros(2, 2, 4, 4, 4)
    ce = math.log(2)
    # per sample: 0.5 for the first; (0 + 1e-5) / (32 + 1e-5) ~ 0 for the second, whose class 1 is absent
    assert dice_ce(logits, target).item() == pytest.approx(ce - 0.25, abs=1e-5)
    # pooled: 2 * 16 / (64 + 32)
    assert dice_ce(logits, target, batch_dice=True).item() == pytest.approx(ce - 1 / 3, abs=1e-5)


def test_partial_labels_merge_unannotated_classes_into_background():
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[:, 2] = 20  # confident in class 2, which this case's dataset does not annotate
    annotates_1 = torch.tensor([[True, True, False]])
    assert dice_ce(logits, target).item() > 10  # fully labelled: confidently wrong
    # merged: background takes p0 + p2 = 1 - p1; Dice over class 1 only, which is absent: smooth / (smooth + sum p1)
    p1 = 1 / (2 + math.exp(20))
    expected = -math.log(1 - p1) - 1e-5 / (1e-5 + 8 * p1)
    assert dice_ce(logits, target, annotates_1).item() == pytest.approx(expected, abs=1e-6)
    assert dice_ce(logits, target, torch.tensor([[True, True, True]])).item() > 10  # all annotated: as before
    # a case annotating nothing adds no gradient
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    dice_ce(logits, target, torch.tensor([[True, False, False]])).backward()
    assert logits.grad.abs().max() < 1e-6  # rounding only


def test_labelled_mask_follows_the_case_prefixes():
    config = TrainConfig(partial_labels=(("kits_", (1,)), ("liver_", (2,))))
    mask = labelled_mask(("kits_01", "other_3", "liver_9"), config, 3)
    assert mask.tolist() == [[True, True, False], [True, True, True], [True, False, True]]
    assert labelled_mask(("a", "b"), TrainConfig(), 3) is None


def test_deep_supervision_weights_and_the_dropped_lowest_resolution():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    target = torch.randint(0, 2, (1, 8, 8, 8))
    outputs = [torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4),
               torch.randn(1, 2, 2, 2, 2, requires_grad=True)]
    loss = deep_supervision_loss(outputs, target)
    half = target[:, 1::2, 1::2, 1::2]  # nearest-exact (as nnU-Net) at a factor of 2: voxel 2j + 1
    expected = 2 / 3 * dice_ce(outputs[0], target) + 1 / 3 * dice_ce(outputs[1], half)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert outputs[2].grad is not None and torch.count_nonzero(outputs[2].grad) == 0


# ---- schedule and configuration -------------------------------------------------------------------

def test_poly_learning_rate():
    assert poly_lr(0.01, 0.0) == 0.01
    assert poly_lr(0.01, 0.5) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 999 / 1000) == pytest.approx(0.01 * 0.001**0.9)
    assert poly_lr(0.01, 1.0) == 0.0


def test_config_from_toml_with_overrides_and_errors(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[train]\nbatch_size = 4\npatch_zyx = [16, 32, 32]\noptimizer = "adamw"\n'
                    '[train.partial_labels]\n"kits_" = [1]\n'
                    "[network]\nfeatures_per_stage = [4, 8]\nstrides_zyx = [[1, 1, 1], [2, 2, 2]]\n"
                    "kernel_sizes_zyx = [[3, 3, 3], [3, 3, 3]]\nblocks_per_stage = [1, 1]\n"
                    "spacing_zyx_mm = [2.5, 2.5, 2.5]\npatch_zyx = [16, 32, 32]\n")
    config, network = load_config(path, epochs=3, learning_rate=None)
    assert (config.batch_size, config.epochs, config.patch_zyx, config.optimizer) == (4, 3, (16, 32, 32), "adamw")
    assert config.learning_rate == 1e-2  # None = not given on the command line
    assert config.labelled_classes("kits_007") == (1,) and config.labelled_classes("flare_1") is None
    assert network.strides_zyx == ((1, 1, 1), (2, 2, 2)) and network.decoder_convs == (2,)
    with pytest.raises(ConfigError, match=r"\[train\] lerning_rate: unknown key"):
        load_config(path, lerning_rate=1)
    with pytest.raises(ConfigError, match=r"\[train\] optimizer: must be one of"):
        load_config(path, optimizer="adam")
    with pytest.raises(ConfigError, match=r"\[train\] epochs: expected an integer"):
        load_config(path, epochs=2.5)
    assert load_config(path, validation_step=1.0)[0].validation_step == 1.0
    with pytest.raises(ConfigError, match=r"\[train\] validation_step: must be in \(0, 1\]"):
        load_config(path, validation_step=1.5)
    network_table = path.read_text().split("[network]")[1]
    path.write_text("[network]" + network_table.replace("patch_zyx = [16, 32, 32]", "patch_zyx = [15, 32, 32]"))
    with pytest.raises(ConfigError, match=r"\[network\] patch_zyx: \[15, 32, 32\] must be divisible by the total"):
        load_config(path)


# ---- sampling ---------------------------------------------------------------------------------------

def two_organ_case() -> TrainingCase:
    labels = np.zeros((40, 64, 64), np.uint8)
    labels[2:30, 2:60, 2:30] = 1  # a large organ
    labels[35:37, 60:62, 60:62] = 2  # a tiny one in the far corner
    image = labels[None].astype(np.float32)
    return TrainingCase("a", image, labels, class_locations(labels, np.random.default_rng(0)))


def test_foreground_oversampling_rate_and_class_balance():
    case = two_organ_case()
    rng = np.random.default_rng(0)
    forced, holds_it = [], []
    for _ in range(300):
        batch = sample_batch([case], 4, (8, 8, 8), rng, oversampling=0.33)
        for labels, label in zip(batch.labels, batch.forced_class, strict=True):
            forced.append(label)
            if label:
                holds_it.append(bool((labels == label).any()))
    forced = np.array(forced)
    assert abs((forced > 0).mean() - 0.33) < 0.04  # 1200 samples: 4 standard deviations
    assert all(holds_it)  # a forced patch holds its class, however small
    assert abs((forced == 2).sum() / (forced > 0).sum() - 0.5) < 0.08  # classes equally likely, not by size


def test_a_forced_voxel_lands_anywhere_in_the_patch_not_at_its_centre():
    """A one-voxel class far from the borders: every forced patch holds it, at positions spread over
    the whole patch (a centred patch taught the Task 1 demo that lesions sit at tile centres)."""
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[20, 20, 20] = 1
    case = TrainingCase("dot", np.zeros((1, 40, 40, 40), np.float32), labels, {1: np.array([[20, 20, 20]])})
    rng = np.random.default_rng(0)
    where = []
    for _ in range(400):
        batch = sample_batch([case], 1, (8, 12, 16), rng, oversampling=1.0)
        found = np.argwhere(batch.labels[0] == 1)
        assert len(found) == 1
        where.append(found[0])
    where = np.array(where)
    for axis, size in enumerate((8, 12, 16)):
        assert set(where[:, axis]) == set(range(size))  # every position along each axis
        assert abs(where[:, axis].mean() - (size - 1) / 2) < 1.0


def test_crop_pads_outside_the_image_and_rank_batches_add_up():
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3) + 1
    out = crop(array, np.array([-1, 0, 2]), (3, 3, 3))
    assert out[0].sum() == 0 and out[1:, :, 0].tolist() == array[:2, :, 2].tolist() and out[:, :, 1:].sum() == 0
    assert [rank_batch_size(5, r, 2) for r in range(2)] == [3, 2]
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        rank_batch_size(1, 0, 2)


# ---- augmentation -----------------------------------------------------------------------------------

def test_spatial_augmentation_moves_image_and_labels_together():
    patch = (16, 32, 32)
    settings = SpatialSettings(rotation_deg=30, scale_range=(0.7, 1.4), elastic=True, p_rotation=1.0,
                               p_scaling=1.0, p_elastic=1.0)
    margin = spatial_margin(patch, settings)
    region = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    labels = torch.zeros((4, *region), dtype=torch.long)
    zz, yy, xx = torch.meshgrid(*(torch.arange(s) for s in region), indexing="ij")
    centre = [s / 2 for s in region]
    labels[:, ((zz - centre[0]) / 6) ** 2 + ((yy - centre[1]) / 12) ** 2 + ((xx - centre[2] - 4) / 8) ** 2 < 1] = 1
    images = labels[:, None].float() * 5
    out_images, out_labels = spatial(images, labels, patch, settings, np.random.default_rng(0),
                                     torch.Generator().manual_seed(0))
    assert out_images.shape == (4, 1, *patch) and out_labels.shape == (4, *patch)
    assert not torch.equal(out_labels, centre_crop(labels, patch))  # it did transform
    agree = (out_images[:, 0] > 2.5) == (out_labels == 1)
    assert agree.float().mean() > 0.99  # bilinear image and nearest labels differ at most on the border
    # the margin is enough: a constant image stays constant inside the patch, no zero padding shows
    ones, _ = spatial(torch.ones_like(images), labels, patch, settings, np.random.default_rng(1),
                      torch.Generator().manual_seed(1))
    assert ones.min() > 0.999


def test_mirroring_flips_image_and_labels_alike_and_intensity_keeps_shape():
    settings = SpatialSettings(p_rotation=0.0, p_scaling=0.0, mirror_axes=(0, 1, 2))
    labels = torch.randint(0, 3, (8, 6, 8, 10))
    images = labels[:, None].float()
    out_images, out_labels = spatial(images, labels, (6, 8, 10), settings, np.random.default_rng(0),
                                     torch.Generator())
    assert torch.equal(out_images[:, 0], out_labels.float())
    assert not torch.equal(out_labels, labels)
    augmented = intensity(torch.randn(16, 1, 6, 8, 10), False, np.random.default_rng(0), torch.Generator())
    assert augmented.shape == (16, 1, 6, 8, 10) and torch.isfinite(augmented).all()


# ---- data -------------------------------------------------------------------------------------------

def test_label_resampling_keeps_thin_structures_and_splits_are_disjoint():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[:, 20, 10:30] = 3  # one voxel thick: nearest neighbour at half size may miss it entirely
    small = resample_labels(labels, (10, 20, 20))
    assert (small == 3).any() and set(np.unique(small)) == {0, 3}
    ids = [f"c{i}" for i in range(10)]
    folds = [split_cases(ids, 2, fold) for fold in range(5)]
    held = [v for _, v in folds]
    assert sorted(c for v in held for c in v) == sorted(ids)  # five folds hold out every case once
    assert all(set(t).isdisjoint(v) for t, v in folds)


# ---- a real run ---------------------------------------------------------------------------------------

# ---- cross pseudo supervision ----------------------------------------------------------------------

def test_cps_weight_ramps_linearly_from_zero_then_holds():
    config = TrainConfig(cps_weight=0.5, cps_ramp_epochs=10)
    assert [cps_ramp(e, config) for e in (0, 2.5, 5, 10, 40)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert cps_ramp(0, TrainConfig(cps_weight=0.5, cps_ramp_epochs=0)) == 0.5
    assert cps_ramp(30, TrainConfig()) == 0.0  # off by default
    with pytest.raises(ConfigError, match="cps_weight"):
        load_config(None, cps_weight=-1)


def test_cps_loss_is_each_network_against_the_others_argmax():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 3, 6, 6, requires_grad=True)
    b = torch.randn(2, 4, 3, 6, 6, requires_grad=True)
    expected = dice_ce(a, b.argmax(1)) + dice_ce(b, a.argmax(1))
    got = cps_loss(a, b)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # with deep supervision the pseudo labels come from the other's finest output
    coarse_a, coarse_b = torch.randn(2, 4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    listed = cps_loss([a, coarse_a], [b, coarse_b])
    expected = (deep_supervision_loss([a, coarse_a], b.argmax(1)) + deep_supervision_loss([b, coarse_b], a.argmax(1)))
    torch.testing.assert_close(listed, expected)
    # networks that agree, confidently, are barely pushed; disagreeing ones are
    confident = 10 * torch.nn.functional.one_hot(torch.randint(0, 4, (2, 3, 6, 6)), 4).permute(0, 4, 1, 2, 3).float()
    assert cps_loss(confident, confident) < cps_loss(confident, confident.roll(1, dims=1)) - 1.0


def test_unlabelled_cases_fill_their_share_of_the_batch():
    rng = np.random.default_rng(0)
    labelled = [TrainingCase("lab", np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), {})]
    unlabelled = [TrainingCase("unl", np.zeros((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), {})]
    ids = []
    for _ in range(200):
        ids += sample_batch(labelled, 4, (8, 8, 8), rng, unlabelled=unlabelled, unlabelled_share=0.25).case_ids
    assert 0.2 < ids.count("unl") / len(ids) < 0.3
    without = sample_batch(labelled, 4, (8, 8, 8), np.random.default_rng(1), unlabelled=[], unlabelled_share=0.25)
    assert set(without.case_ids) == {"lab"}


def test_cps_trains_two_networks_and_learns_from_unlabelled_cases(tmp_path, caplog):
    from flarebox import io
    from flarebox_tools.phantoms import write_dataset
    from flarebox_tools.training.checkpoint import load, strip_optimizer
    from flarebox_tools.training.trainer import train

    raw = write_dataset(tmp_path / "raw", 4, 0, spacing_zyx_mm=(6.0, 6.0, 6.0))
    unlabelled = raw / "labelsTr" / "phantom_0003.nii.gz"  # its labels withheld: an empty map
    volume = io.read_image(unlabelled)
    io.write_labels(unlabelled, np.zeros_like(volume.array_zyx, dtype=np.uint8), volume.geometry)
    config = TrainConfig(epochs=2, iterations_per_epoch=3, batch_size=2, validation_cases=1, validate_every_epochs=2,
                         device="cpu", optimizer="adamw", learning_rate=3e-3, cps_weight=0.5, cps_ramp_epochs=1,
                         partial_labels=(("phantom_0003", ()),))
    with caplog.at_level(logging.INFO, logger="flarebox_tools.training"):
        final = train(raw, tmp_path / "model", config, network_spec=TINY_NETWORK, cache_dir=tmp_path / "cache")
    assert "1 unlabelled cases: 50% of the samples" in caplog.text
    state = load(final)
    partner = state["cps_partner"]["network_weights"]
    ours = state["network_weights"]
    assert partner.keys() == ours.keys()
    assert any(not torch.equal(partner[k], ours[k]) for k in ours)  # two networks, not one twice
    assert all(torch.isfinite(v).all() for v in (*partner.values(), *ours.values()))
    assert all(np.isfinite(state["logging"]["train_losses"]))
    assert "cps_partner" not in load(strip_optimizer(final))  # never shipped

    caplog.clear()
    without = dataclasses.replace(config, cps_weight=0.0, epochs=1)
    with caplog.at_level(logging.INFO, logger="flarebox_tools.training"):
        train(raw, tmp_path / "plain", without, network_spec=TINY_NETWORK, cache_dir=tmp_path / "cache")
    assert "1 unlabelled cases: unused (cps_weight = 0)" in caplog.text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three phantoms, a tiny network, 6 short epochs."""
    from flarebox_tools.phantoms import write_dataset
    from flarebox_tools.training.trainer import train

    root = tmp_path_factory.mktemp("train")
    raw = write_dataset(root / "raw", 3, 0, spacing_zyx_mm=(4.0, 4.0, 4.0))
    config = TrainConfig(epochs=6, iterations_per_epoch=4, batch_size=2, validation_cases=1,
                         validate_every_epochs=3, device="cpu")
    path = train(raw, root / "model", config, network_spec=TINY_NETWORK, cache_dir=root / "cache")
    return root, path


def test_a_short_run_lowers_the_loss_and_writes_nnunet_checkpoints(trained):
    root, path = trained
    state = torch.load(path, weights_only=False)
    assert {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
            "init_args", "trainer_name", "inference_allowed_mirroring_axes"} <= set(state)
    assert state["current_epoch"] == 6 and state["trainer_name"] == "nnUNetTrainer"
    assert state["init_args"]["configuration"] == "3d_fullres" and state["init_args"]["fold"] == 0
    losses = state["logging"]["train_losses"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1
    assert [v["epoch"] for v in state["logging"]["validation"]] == [3, 6]
    assert set(state["logging"]["validation"][0]["per_class"]) >= {"liver", "spleen"}  # FLARE organ scoring
    assert (path.parent / "checkpoint_best.pth").is_file()
    cached = next((root / "cache").iterdir())
    assert len(list(cached.glob("*_image.npy"))) == 3  # preprocessed once, as .npy


def test_the_engine_loads_the_checkpoint_and_segments(trained):
    from flarebox import io
    from flarebox.config import from_dict
    from flarebox.models import load_network, load_plan
    from flarebox.pipeline import Predictor

    root, _ = trained
    plan = load_plan(root / "model")
    network = load_network(plan, 0)
    assert network(torch.zeros(1, 1, *plan.patch_zyx)).shape == (1, 14, *plan.patch_zyx)
    predictor = Predictor.from_config(from_dict({"model": {"folder": str(root / "model")},
                                                 "inference": {"backend": "torch", "device": "cpu"}}, root))
    volume = io.read_image(root / "raw" / "imagesTr" / "phantom_0000_0000.nii.gz")
    labels = predictor.segment(volume)
    assert labels.shape == volume.array_zyx.shape and labels.max() < 14


RESUME_TOML = TINY_NETWORK_TOML + """
[train]
epochs = 4
iterations_per_epoch = 6
batch_size = 2
optimizer = "adamw"
learning_rate = 0.003
validation_cases = 1
validate_every_epochs = 100
device = "cpu"
"""


def _train_command(trained, model: Path, toml: Path, *extra: str) -> list[str]:
    import sys

    root, _ = trained
    return [sys.executable, "-m", "flarebox_tools.training", "--dataset", str(root / "raw"), "--out", str(model),
            "--config", str(toml), "--cache", str(root / "cache"), *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["network_weights"]


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    """The reference: the CLI's run of RESUME_TOML from start to end in one go."""
    root = tmp_path_factory.mktemp("uninterrupted")
    toml = root / "train.toml"
    toml.write_text(RESUME_TOML)
    subprocess.run(_train_command(trained, root / "model", toml), check=True, capture_output=True, timeout=600)
    return toml, _weights(root / "model" / "fold_0" / "checkpoint_final.pth")


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training never got there"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "sigterm to the group", "sigkill"])
def test_a_killed_run_goes_on_from_the_step_it_reached_when_rerun(trained, uninterrupted, tmp_path, how):
    """SIGTERM (to the trainer, or to its whole process group with the batch worker, as Ctrl-C does):
    the run saves the step it reached and exits 143; SIGKILL: the periodic checkpoint (here after
    every step) is all there is. Either way the same command goes on from that step, with the same
    optimiser state, schedule and batches, and ends bit for bit where an uninterrupted run ends."""
    import os
    import signal

    toml, reference = uninterrupted
    model = tmp_path / "model"
    latest = model / "fold_0" / "checkpoint_latest.pth"
    command = _train_command(trained, model, toml, "--checkpoint-every-minutes", "0.0001")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    if how.startswith("sigterm"):
        _wait_for(lambda: latest.is_file(), process)  # mid-training, past the first steps
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "run the same command again" in output
    else:
        _wait_for(lambda: latest.is_file() and torch.load(latest, weights_only=False)["logging"]["progress"]
                  ["steps_done"] >= 8, process)
        process.kill()
        process.communicate(timeout=60)
    state = torch.load(latest, weights_only=False)
    reached = state["logging"]["progress"]["steps_done"]
    assert 0 < reached < 24 and not (model / "fold_0" / "checkpoint_final.pth").exists()
    assert not list(model.rglob(".*.tmp")) or how == "sigkill"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming at step {reached} of 24" in rerun.stdout
    final = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 4 and len(final["logging"]["train_losses"]) == 4
    for name, tensor in reference.items():
        assert torch.equal(final["network_weights"][name], tensor), name  # bit for bit


def test_a_finished_run_is_not_retrained_and_restart_or_another_seed_says_so(trained, uninterrupted, tmp_path):
    import shutil

    toml, _ = uninterrupted
    model = tmp_path / "model"
    shutil.copytree(toml.parent / "model", model)
    again = subprocess.run(_train_command(trained, model, toml), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already trained to the end" in again.stdout
    other = subprocess.run(_train_command(trained, model, toml, "--seed", "7"), capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2 and "other seed (seed=0)" in other.stderr
    continued = subprocess.run(_train_command(trained, tmp_path / "empty", toml, "--continue"), capture_output=True,
                               text=True, timeout=300)
    assert continued.returncode == 2 and "no checkpoint to continue from" in continued.stderr


def test_init_weights_start_from_a_checkpoint_and_a_wrong_one_is_one_line(trained, tmp_path):
    from flarebox_tools.training.trainer import train

    root, path = trained
    config = TrainConfig(epochs=1, iterations_per_epoch=1, batch_size=2, validation_cases=1, device="cpu",
                         optimizer="adamw", learning_rate=1e-9, weight_decay=0.0, init_weights=str(path),
                         validate_every_epochs=100)
    final = train(root / "raw", tmp_path / "model", config, network_spec=TINY_NETWORK, cache_dir=root / "cache")
    start, end = torch.load(path, weights_only=False), torch.load(final, weights_only=False)
    for name, tensor in start["network_weights"].items():  # one step of a vanishing learning rate
        torch.testing.assert_close(end["network_weights"][name], tensor, atol=1e-6, rtol=0)
    other = TrainConfig(epochs=1, iterations_per_epoch=1, batch_size=2, validation_cases=1, device="cpu",
                        init_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="init_weights"):
        train(root / "raw", tmp_path / "model2", other, network_spec=TINY_NETWORK, cache_dir=root / "cache")


def test_bf16_autocast_follows_f32_over_a_few_steps(trained, tmp_path):
    """The CPU bf16 path (forced here; by default only CPUs with native bf16 take it) trains like f32
    from the same weights and batches: its losses differ, as bf16 must, but by less than 3 %."""
    root, _ = trained
    from flarebox_tools.training.trainer import train

    losses = {}
    for dtype in ("bfloat16", "float16"):
        amp = dtype == "bfloat16"  # float16 is CUDA's: on the CPU with amp off it is the f32 reference
        config = TrainConfig(epochs=4, iterations_per_epoch=1, batch_size=2, validation_cases=1,
                             validate_every_epochs=100, device="cpu", amp=amp, amp_dtype=dtype, data_workers=0,
                             optimizer="adamw", learning_rate=1e-3)
        path = train(root / "raw", tmp_path / dtype, config, network_spec=TINY_NETWORK, cache_dir=root / "cache")
        losses[dtype] = np.array(torch.load(path, weights_only=False)["logging"]["train_losses"])
    bf16, f32 = losses["bfloat16"], losses["float16"]
    assert not np.array_equal(bf16, f32)
    np.testing.assert_allclose(bf16, f32, rtol=0.03)


def _first_batch(root: Path, spec: NetworkSpec) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A freshly initialised network of `spec` and a batch of two patches of the `trained` phantoms
    at the network's spacing, as the trainer makes them."""
    from flarebox.models import build_network, load_plan
    from flarebox_tools.training.data import list_cases, load_cached, prepare_cache
    from flarebox_tools.training.plans import dataset_labels, write_plans
    from flarebox_tools.training.sampling import sample_batch
    from flarebox_tools.training.trainer import he_init

    model = root / f"model_{'x'.join(map(str, spec.patch_zyx))}"
    if not (model / "plans.json").is_file():
        labels, channel = dataset_labels(root / "raw")
        write_plans(model, spec, labels, channel_name=channel)
    plan = load_plan(model)
    raw = list_cases(root / "raw")
    cases = load_cached([c.case_id for c in raw], prepare_cache(raw, plan, root / "cache_bf16"))
    batch = sample_batch(cases, 2, spec.patch_zyx, np.random.default_rng(0), oversampling=1.0)
    torch.manual_seed(0)
    network = build_network(plan, deep_supervision=True)
    network.apply(he_init)
    return network.train(), torch.from_numpy(batch.images), torch.from_numpy(batch.labels).long()


def test_bf16_gradients_are_checked_against_f32(trained):
    """The check the trainer runs before it trains in bf16 on a CPU: bf16 always differs from f32
    (tolerance 0 fails), and on a network whose feature maps are all larger than a few voxels the
    difference stays within the default tolerance."""
    from flarebox_tools.training.trainer import bf16_gradients_agree

    root, _ = trained
    network, x, y = _first_batch(root, TINY_NETWORK)
    config = TrainConfig()
    assert not bf16_gradients_agree(network, x, y, None, config, tolerance=0.0)
    assert bf16_gradients_agree(network, x, y, None, config)
    assert all(p.grad is None for p in network.parameters())


def test_forced_bf16_never_trains_on_wrong_gradients(trained, tmp_path, caplog):
    """The Task 1 demo network, whose deepest stages are 2 voxels deep: under bf16 autocast, torch
    2.13.0's CPU Conv3d weight gradient there is wrong on AVX-512 BF16 CPUs and one step turned every
    weight into NaN. Forced bf16 training must give finite losses: on such a CPU because the check
    falls back to f32 (and says so), elsewhere because bf16 is right there."""
    from flarebox_tools.training.demo import TASKS
    from flarebox_tools.training.trainer import bf16_gradients_agree, train

    root, _ = trained
    spec = dataclasses.replace(TASKS["task1"].network, spacing_zyx_mm=(8.0, 8.0, 8.0))  # its stages, a small cache
    network, x, y = _first_batch(root, spec)
    agree = bf16_gradients_agree(network, x, y, None, TrainConfig())
    config = TrainConfig(epochs=3, iterations_per_epoch=1, batch_size=2, validation_cases=1, validate_every_epochs=100,
                         device="cpu", amp=True, amp_dtype="bfloat16", data_workers=0, optimizer="adamw",
                         foreground_oversampling=1.0)
    with caplog.at_level(logging.WARNING, logger="flarebox_tools.training"):
        path = train(root / "raw", tmp_path / "model", config, network_spec=spec, cache_dir=root / "cache_bf16")
    losses = torch.load(path, weights_only=False)["logging"]["train_losses"]
    assert np.isfinite(losses).all(), losses
    assert ("training in f32" in caplog.text) == (not agree)


def test_autocast_dtype_by_device_and_cpu():
    from flarebox_tools.training.trainer import autocast_dtype, cpu_has_native_bf16

    assert autocast_dtype(TrainConfig(), torch.device("cuda", 0)) == torch.float16
    assert autocast_dtype(TrainConfig(amp=False), torch.device("cuda", 0)) is None
    assert autocast_dtype(TrainConfig(amp_dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16
    expected = torch.bfloat16 if cpu_has_native_bf16() else None  # emulated bf16 is slower than f32
    assert autocast_dtype(TrainConfig(), torch.device("cpu")) == expected


def test_batches_are_a_function_of_the_step_whoever_makes_them(trained):
    """The same step gives the same batch inline, in a worker process, and from a later start."""
    from flarebox.models import load_plan
    from flarebox_tools.training.augment import SpatialSettings, spatial_margin
    from flarebox_tools.training.data import cache_folder, load_cached
    from flarebox_tools.training.loader import BatchRecipe, batches

    root, _ = trained
    plan = load_plan(root / "model")
    cases = load_cached(["phantom_0000", "phantom_0001"], cache_folder(root / "cache", plan))
    settings = SpatialSettings(rotation_deg=30, p_rotation=1.0, p_scaling=1.0)
    recipe = BatchRecipe(cases, 2, (16, 32, 32), spatial_margin((16, 32, 32), settings), 0.5, settings,
                         True, True, seed=3, rank=0)
    inline = list(batches(recipe, 0, 5, workers=0))
    worker = list(batches(recipe, 2, 5, workers=1))
    for a, b in zip(inline[2:], worker, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.case_ids == b.case_ids
    assert not torch.equal(inline[0].images, inline[1].images)
    other_rank = next(batches(BatchRecipe(**{**vars(recipe), "rank": 1}), 2, 3, workers=0))
    assert not torch.equal(other_rank.images, inline[2].images)
    assert inline[0].images.shape == (2, 1, 16, 32, 32) and inline[0].labels.dtype == torch.int64


@pytest.mark.skipif(not NNUNET_PYTHON.exists(), reason="nnU-Net reference environment missing (make nnunet-env)")
def test_nnunet_predictor_loads_the_model_folder(trained, tmp_path):
    """nnU-Net 2.8.1's own predictor reads our plans.json and checkpoint and computes the same logits."""
    from flarebox.models import load_network, load_plan

    root, _ = trained
    plan = load_plan(root / "model")
    x = np.random.default_rng(0).normal(size=(1, *plan.patch_zyx)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, torch\n"
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
        "p = nnUNetPredictor(use_mirroring=False, device=torch.device('cpu'), allow_tqdm=False)\n"
        "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))\n"
        "with torch.no_grad(): np.save(sys.argv[3], p.network(torch.from_numpy(np.load(sys.argv[2]))[None]).numpy())\n"
    )
    subprocess.run([str(NNUNET_PYTHON), "-c", script, str(root / "model"), str(tmp_path / "x.npy"),
                    str(tmp_path / "theirs.npy")], check=True, capture_output=True, timeout=300)
    with torch.no_grad():
        ours = load_network(plan, 0)(torch.from_numpy(x)[None]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "theirs.npy"), ours, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_uses_fp16_autocast_and_grad_scaling(trained, tmp_path):
    from flarebox_tools.training.trainer import train

    root, _ = trained
    config = TrainConfig(epochs=2, iterations_per_epoch=3, batch_size=2, validation_cases=1, device="cuda",
                         elastic_deformation=True)
    path = train(root / "raw", tmp_path / "model", config, network_spec=TINY_NETWORK, cache_dir=root / "cache")
    state = torch.load(path, weights_only=False)
    assert state["grad_scaler_state"] is not None and len(state["logging"]["train_losses"]) == 2
    assert all(t.device.type == "cpu" for t in state["network_weights"].values())  # loads anywhere


def test_cps_demo_withholds_all_but_the_first_labels(tmp_path):
    from flarebox import io
    from flarebox_tools.phantoms import write_dataset
    from flarebox_tools.training.cps_demo import withheld_dataset

    pool = write_dataset(tmp_path / "pool", 3, 0, spacing_zyx_mm=(8.0, 8.0, 8.0))
    assert withheld_dataset(pool, tmp_path / "raw", 1) == (1, 2)
    labels = sorted(p.name for p in (tmp_path / "raw" / "labelsTr").iterdir())
    assert labels == ["phantom_0000.nii.gz", "unl_phantom_0001.nii.gz", "unl_phantom_0002.nii.gz"]
    kept = io.read_image(tmp_path / "raw" / "labelsTr" / labels[0]).array_zyx
    withheld = io.read_image(tmp_path / "raw" / "labelsTr" / labels[1])
    original = io.read_image(pool / "labelsTr" / "phantom_0001.nii.gz")
    assert kept.max() > 0 and withheld.array_zyx.max() == 0
    assert withheld.geometry == original.geometry  # the same grid, no label on it
    assert (tmp_path / "raw" / "imagesTr" / "unl_phantom_0001_0000.nii.gz").stat().st_ino == \
        (pool / "imagesTr" / "phantom_0001_0000.nii.gz").stat().st_ino  # linked, not copied


def test_cps_demo_reuses_a_shipped_run_and_tables_every_run(tmp_path):
    import json

    from flarebox_tools.training import cps_demo

    final = tmp_path / "training" / "checkpoint_final.pth"
    final.parent.mkdir()
    final.write_bytes(b"")
    organ = {"dsc": 0.5, "nsd": 0.25}
    scores = {"backend": "openvino auto", "settings": "config.toml",
              "held_out_phantoms": {"mean": {"liver": organ}}, "real_ct": {"scores": {"liver": organ}},
              "training": {"minutes": 1.0, "steps": 10}}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "scores.json").write_text(json.dumps(scores))
    # shipped after the checkpoint was written: its scores are reused, nothing is converted again
    assert cps_demo._shipped("task2", final, tmp_path / "model", raw=tmp_path, held_out=tmp_path,
                             task_config=None) == scores
    summary = {"task": "task2", "labelled": 1, "unlabelled": 2, "steps": 10, "cps_weight": 0.5,
               "runs": {"labels_only": scores, "cps": scores, "cps_same_steps": scores}}
    text = cps_demo.markdown(summary)
    assert "as many CPS steps" in text
    assert "| liver | " + " | ".join(["0.500 / 0.250"] * 6) + " |" in text
