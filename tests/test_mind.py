"""mind: MIND-SSC descriptors on hand-made volumes and an MRI-like phantom; and the engine's MIND
feature mode (config, preprocessing, a 12-channel model segmenting a real NIfTI file)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flarebox.mind import MIND_CHANNELS, OFFSETS, PAIRS, mind_ssc, mind_ssc_numpy


def smooth_field(shape_zyx, spacing_zyx_mm, dtype=torch.float64) -> torch.Tensor:
    """A smooth analytic image sampled in mm, so grids of different spacing see the same function."""
    z, y, x = (torch.arange(n, dtype=dtype) * s for n, s in zip(shape_zyx, spacing_zyx_mm, strict=True))
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.sin(xx / 7) + torch.cos(yy / 5) * torch.sin(zz / 6) + 0.5 * torch.cos((xx + zz) / 4)


@pytest.fixture(scope="module")
def mri_phantom():
    from flarebox_tools.phantoms import generate_case

    phantom = generate_case(3, modality="t1", spacing_zyx_mm=(4.0, 4.0, 4.0))
    return torch.from_numpy(phantom.image_zyx.astype(np.float32)), phantom.spacing_zyx_mm


def test_pairs_are_the_twelve_non_opposite_pairs_of_the_six_neighbourhood():
    assert len(PAIRS) == MIND_CHANNELS == 12 and len(set(PAIRS)) == 12
    assert all(OFFSETS[i][0] != OFFSETS[j][0] for i, j in PAIRS)  # never two points on one axis


def test_shape_dtype_and_range_and_largest_descriptor_is_one(mri_phantom):
    image, spacing = mri_phantom
    out = mind_ssc(image, spacing)
    assert out.shape == (12, *image.shape) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # the published normalisation: the smallest patch distance maps to exactly 1 at every voxel
    assert torch.allclose(out.max(dim=0).values, torch.ones_like(image))
    assert float(out.min()) < 0.2  # and edges produce small values: not a constant output
    as_numpy = mind_ssc_numpy(image.numpy(), spacing)
    assert as_numpy.dtype == np.float32 and np.allclose(as_numpy, out.numpy())


def test_constant_image_gives_all_ones():
    for dtype in (torch.float32, torch.float64):
        out = mind_ssc(torch.full((5, 6, 7), 123.0, dtype=dtype), (2.5, 0.8, 0.8))
        assert out.dtype == dtype and torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (700.0, 3.0)])
def test_step_edge_seen_by_one_side_gives_exp_minus_three_on_its_four_pairs(low, high):
    # Edge between x = 9 and x = 10; the +x neighbour lies 2 voxels away and the patch reaches
    # 1 voxel (sigma 0.5 voxel, 2-sigma support). At x = 7 only pairs holding the +x point straddle
    # the edge: 4 of 12 pairs have the same distance c and the rest 0, so V = 4c / 12 and
    # MIND = exp(-c / V) = exp(-3) on those 4, whatever the contrast; at x = 12 the same for -x.
    image = torch.full((8, 10, 20), low, dtype=torch.float64)
    image[..., 10:] = high
    out = mind_ssc(image, (2.0, 1.0, 1.0), dilation_mm=2.0, sigma_mm=0.5)
    plus_x = [k for k, (i, j) in enumerate(PAIRS) if (2, 1) in (OFFSETS[i], OFFSETS[j])]
    minus_x = [k for k, (i, j) in enumerate(PAIRS) if (2, -1) in (OFFSETS[i], OFFSETS[j])]
    assert len(plus_x) == len(minus_x) == 4
    for x_index, crossing in ((7, plus_x), (12, minus_x)):
        expected = torch.ones(12, dtype=torch.float64)
        expected[crossing] = math.exp(-3)
        assert torch.allclose(out[:, :, :, x_index], expected[:, None, None].expand(12, 8, 10), atol=1e-12)
    far = out[..., :5]
    assert torch.equal(far, torch.ones_like(far))


def test_edge_across_thick_slices_is_found_at_its_distance_in_mm():
    # 3 mm slices, 3 mm dilation: the z neighbour is exactly one slice away (same analytic value).
    image = torch.zeros(12, 8, 8, dtype=torch.float64)
    image[6:] = 50.0
    out = mind_ssc(image, (3.0, 1.0, 1.0), dilation_mm=3.0, sigma_mm=0.3)
    plus_z = [k for k, (i, j) in enumerate(PAIRS) if (0, 1) in (OFFSETS[i], OFFSETS[j])]
    expected = torch.ones(12, dtype=torch.float64)
    expected[plus_z] = math.exp(-3)
    assert torch.allclose(out[:, 5, 4, 4], expected, atol=1e-12)


def test_exactly_invariant_to_an_affine_intensity_map(mri_phantom):
    image, spacing = mri_phantom
    reference = mind_ssc(image.double(), spacing)
    assert torch.allclose(mind_ssc(37.0 * image.double() - 5000.0, spacing), reference, atol=1e-9)


def test_two_level_image_is_invariant_to_any_monotonic_map():
    # on two intensity levels every increasing map is affine, and linear interpolation keeps it so
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 16, 18)], indexing="ij")
    levels = np.where(x**2 + (y / 0.7) ** 2 + (z / 0.8) ** 2 < 0.5, 2.0, 0.5)
    a = mind_ssc(torch.from_numpy(levels), (2.0, 1.2, 1.2))
    b = mind_ssc(torch.from_numpy(np.exp(3 * levels)), (2.0, 1.2, 1.2))
    assert torch.allclose(a, b, atol=1e-9)


def test_smooth_monotonic_remaps_move_descriptors_far_less_than_a_one_voxel_shift(mri_phantom):
    # Tolerance: on an MRI-like phantom, sqrt and log of the [0, 1]-scaled image change the
    # descriptors by 0.048 and 0.054 on average (measured); we allow 0.07. Not exact because a
    # nonlinear map changes the ratios of contrasts between different tissue pairs. For scale, moving
    # the image by one voxel changes them by 0.26.
    image, spacing = mri_phantom
    scaled = (image - image.min()) / (image.max() - image.min())
    reference = mind_ssc(scaled, spacing)
    for remap in (torch.sqrt, lambda v: torch.log(v + 0.05)):
        assert float((mind_ssc(remap(scaled), spacing) - reference).abs().mean()) < 0.07
    shifted = torch.roll(scaled, 1, dims=2)
    assert float((mind_ssc(shifted, spacing) - reference).abs().mean()) > 0.2


def test_float32_and_float64_agree(mri_phantom):
    image, spacing = mri_phantom
    assert float((mind_ssc(image, spacing).double() - mind_ssc(image.double(), spacing)).abs().max()) < 1e-4


def test_anisotropic_grid_gives_the_descriptors_of_the_same_image_on_a_fine_grid():
    fine = mind_ssc(smooth_field((40, 30, 30), (1.0, 1.0, 1.0)), (1.0, 1.0, 1.0))
    coarse_image = smooth_field((20, 30, 30), (2.0, 1.0, 1.0))
    coarse = mind_ssc(coarse_image, (2.0, 1.0, 1.0))
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from replicated borders
    same_points = fine[:, ::2][inner]
    assert float((coarse[inner] - same_points).abs().mean()) < 0.02  # measured 0.009
    # ignoring the spacing (treating 2 mm slices as 1 mm) is clearly wrong: measured 0.17
    ignored = mind_ssc(coarse_image, (1.0, 1.0, 1.0))
    assert float((ignored[inner] - same_points).abs().mean()) > 0.1


def test_bad_inputs_fail_with_the_reason():
    with pytest.raises(ValueError, match="z, y, x"):
        mind_ssc(torch.zeros(4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        mind_ssc(torch.zeros(4, 4, 4), (1.0, 0.0, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(mri_phantom):
    image, spacing = mri_phantom
    on_gpu = mind_ssc(image.cuda(), spacing)
    assert on_gpu.device.type == "cuda"
    assert float((on_gpu.cpu() - mind_ssc(image, spacing)).abs().max()) < 1e-4


# ---- the engine's MIND feature mode -----------------------------------------------------------------

@pytest.fixture(scope="module")
def mind_model_dir(tmp_path_factory):
    """A tiny 12-channel (MIND-SSC) model folder with random weights, as the trainer writes it."""
    from flarebox.models import build_network, load_plan
    from flarebox_tools.phantoms import ORGAN_LABELS
    from flarebox_tools.training.checkpoint import save
    from flarebox_tools.training.config import NetworkSpec
    from flarebox_tools.training.plans import write_plans

    folder = tmp_path_factory.mktemp("mind_model")
    spec = NetworkSpec(features_per_stage=(4, 8, 16), strides_zyx=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                       kernel_sizes_zyx=((3, 3, 3),) * 3, blocks_per_stage=(1, 1, 1),
                       spacing_zyx_mm=(6.0, 6.0, 6.0), patch_zyx=(16, 32, 32),
                       normalization="ZScoreNormalization", input_features="mind")
    write_plans(folder, spec, ORGAN_LABELS, channel_name="CT")
    torch.manual_seed(0)
    save(folder / "fold_0" / "checkpoint_final.pth", build_network(load_plan(folder)), model_dir=folder, fold=0,
         epochs_done=0, logging={}, best_ema=None, mirror_axes=(0, 1, 2))
    return folder


@pytest.fixture(scope="module")
def mri_file(tmp_path_factory):
    from flarebox_tools.phantoms import generate_case, write_case

    phantom = generate_case(5, modality="t2", spacing_zyx_mm=(5.0, 4.0, 4.0), orientation="ras")
    return write_case(phantom, tmp_path_factory.mktemp("mri"), None, "mri_0001")


def test_mind_model_folder_declares_twelve_mind_channels(mind_model_dir):
    import json

    from flarebox.models import load_plan

    plan = load_plan(mind_model_dir)
    assert plan.input_features == "mind" and plan.num_input_channels == 12
    assert {n.scheme for n in plan.normalizations} == {"ZScoreNormalization"}
    dataset = json.loads((mind_model_dir / "dataset.json").read_text())
    assert list(dataset["channel_names"].values()) == [f"MIND-SSC {i}" for i in range(12)]


def test_preprocessing_for_a_mind_model_is_mind_of_the_intensity_preprocessing(mind_model_dir, mri_file):
    import dataclasses

    from flarebox import io
    from flarebox.models import load_plan
    from flarebox.preprocess import preprocess

    plan = load_plan(mind_model_dir)
    volume = io.read_image(mri_file)
    pre = preprocess(volume.array_zyx.copy(), volume.geometry.spacing_zyx_mm, plan, resampler="torch")
    intensity_plan = dataclasses.replace(plan, normalizations=plan.normalizations[:1],
                                         use_mask_for_norm=plan.use_mask_for_norm[:1], input_features="intensity")
    plain = preprocess(volume.array_zyx.copy(), volume.geometry.spacing_zyx_mm, intensity_plan, resampler="torch")
    assert pre.data.shape == (12, *plain.data.shape[1:]) and pre.data.dtype == np.float32
    expected = mind_ssc(torch.from_numpy(plain.data[0]), plan.spacing_zyx_mm).numpy()
    assert np.allclose(pre.data, expected, atol=1e-6)
    assert pre.bbox == plain.bbox and pre.spacing_zyx_mm == plan.spacing_zyx_mm


def test_zero_shot_mode_segments_a_nifti_and_a_mismatched_config_fails_at_start(mind_model_dir, mri_file,
                                                                                  tmp_path):
    import SimpleITK as sitk

    from flarebox.config import from_dict
    from flarebox.errors import ConfigError
    from flarebox.pipeline import Predictor, run_folder

    def config(features):
        return from_dict({"model": {"folder": str(mind_model_dir)}, "preprocess": {"features": features},
                          "inference": {"backend": "torch", "device": "cpu"}}, tmp_path)

    with pytest.raises(ConfigError, match=r"\[preprocess\] features: 'intensity'.*'mind'"):
        Predictor.from_config(config("intensity"))
    with pytest.raises(ConfigError, match=r"\[preprocess\] features"):
        config("hog")
    failures = run_folder(Predictor.from_config(config("mind")), mri_file.parent, tmp_path / "out")
    assert failures == 0
    written = sitk.ReadImage(str(tmp_path / "out" / "mri_0001.nii.gz"))
    source = sitk.ReadImage(str(mri_file))
    assert written.GetSize() == source.GetSize() and written.GetDirection() == source.GetDirection()
    assert sitk.GetArrayFromImage(written).max() <= 13


def test_an_intensity_model_refuses_mind_features(tiny_torch_model_dir, tmp_path):
    from flarebox.config import from_dict
    from flarebox.errors import ConfigError
    from flarebox.pipeline import Predictor

    config = from_dict({"model": {"folder": str(tiny_torch_model_dir)}, "preprocess": {"features": "mind"},
                        "inference": {"backend": "torch", "device": "cpu"}}, tmp_path)
    with pytest.raises(ConfigError, match="'intensity' input"):
        Predictor.from_config(config)
