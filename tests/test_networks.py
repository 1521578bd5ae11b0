"""networks: the lightweight 2.5D network (LightUNet), its blocks against plain reference
implementations, and its path through the engine (sliding window, OpenVINO) against a slice loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from flarebox.backends.torch_runtime import TorchBackend
from flarebox.models import build_network, load_network, load_plan
from flarebox.networks import ECA, LightUNet, SeparableConv, eca_kernel_size
from flarebox.sliding_window import predict_logits
from flarebox_tools.training.config import NetworkSpec
from flarebox_tools.training.plans import write_plans

PUBLISHED_PARAMETERS = 405_000  # FLARE.md: 0.405 M
LABELS = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
LIGHT = NetworkSpec(kind="light", features_per_stage=(16, 32, 64, 128, 256),
                    strides_zyx=((1, 1, 1),) + ((1, 2, 2),) * 4, kernel_sizes_zyx=((1, 3, 3),) * 5,
                    blocks_per_stage=(2,) * 5, spacing_zyx_mm=(2.5, 2.5, 2.5), patch_zyx=(12, 64, 64),
                    ct_clip_hu=(-160.0, 300.0), ct_mean_hu=70.0, ct_std_hu=230.0)


@pytest.fixture(scope="module")
def light_folder(tmp_path_factory):
    """A model folder of the published network (random weights), as the trainer writes it."""
    folder = write_plans(tmp_path_factory.mktemp("light") / "model", LIGHT, LABELS)
    torch.manual_seed(0)
    network = build_network(load_plan(folder)).eval()
    with torch.no_grad():  # GroupNorm's affine parameters away from 1 and 0, so that they count
        for module in network.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    (folder / "fold_0").mkdir()
    torch.save({"network_weights": network.state_dict()}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def test_parameter_count_is_the_published_networks():
    network = LightUNet(1, 14)
    count = sum(p.numel() for p in network.parameters())
    print(f"LightUNet: {count:,} parameters (published: {PUBLISHED_PARAMETERS:,})")
    assert abs(count - PUBLISHED_PARAMETERS) / PUBLISHED_PARAMETERS < 0.03


def test_shapes_follow_the_tile():
    network = LightUNet(1, 14).eval()
    with torch.no_grad():
        out = network(torch.randn(2, 1, 5, 48, 32))
    assert out.shape == (2, 14, 5, 48, 32)
    with torch.no_grad():
        stacks = network.forward_slices(torch.randn(7, 3, 64, 80))
    assert stacks.shape == (7, 14, 64, 80)
    with pytest.raises(ValueError):
        LightUNet(1, 14, slices=2)


def test_eca_kernel_size_is_ecanets_rule():
    # |log2(C) / 2 + 1 / 2|, odd: ECA-Net's table gives 3 for 16..64 channels and 5 for 256
    assert [eca_kernel_size(c) for c in (16, 32, 64, 128, 256)] == [3, 3, 3, 5, 5]


def test_eca_equals_a_plain_implementation():
    torch.manual_seed(1)
    eca = ECA(64)
    x = torch.randn(3, 64, 9, 7)
    weights = eca.conv.weight.detach()[0, 0]  # (k,)
    k = weights.numel()
    means = x.mean(dim=(2, 3))
    gate = torch.zeros_like(means)
    for c in range(64):  # channel c's gate: its neighbours' means, zero beyond the ends, weighted
        for j in range(k):
            n = c + j - k // 2
            if 0 <= n < 64:
                gate[:, c] += weights[j] * means[:, n]
    expected = x * torch.sigmoid(gate)[:, :, None, None]
    torch.testing.assert_close(eca(x), expected, rtol=1e-5, atol=1e-6)


def test_separable_convolution_equals_a_plain_implementation():
    torch.manual_seed(2)
    block = SeparableConv(6, 10, stride=2, groups=2).eval()
    x = torch.randn(2, 6, 11, 12)
    dw, pw = block.depthwise, block.pointwise
    per_channel = torch.cat([F.conv2d(x[:, c:c + 1], dw.weight[c:c + 1], dw.bias[c:c + 1], stride=2, padding=1)
                             for c in range(6)], dim=1)  # each channel its own 3x3 filter
    mixed = torch.einsum("oc,bchw->bohw", pw.weight[:, :, 0, 0], per_channel) + pw.bias[None, :, None, None]
    groups = mixed.reshape(2, 2, 5, *mixed.shape[2:])  # GroupNorm: 2 groups of 5 channels
    mean = groups.mean(dim=(2, 3, 4), keepdim=True)
    var = groups.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    normed = ((groups - mean) / torch.sqrt(var + 1e-5)).reshape_as(mixed)
    normed = normed * block.norm.weight[None, :, None, None] + block.norm.bias[None, :, None, None]
    expected = F.leaky_relu(normed, 0.01)
    assert dw.groups == 6 and dw.weight.shape == (6, 1, 3, 3) and pw.weight.shape == (10, 6, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def slice_loop(network: LightUNet, data: np.ndarray) -> np.ndarray:
    """Each slice from itself and its neighbours (repeated at the scan's ends), one at a time."""
    padded = np.pad(data, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    out = []
    with torch.no_grad():
        for z in range(data.shape[1]):
            stack = torch.from_numpy(np.ascontiguousarray(padded[:, z:z + 3]))  # (1, 3, y, x): channels = slices
            out.append(network.forward_slices(stack)[0].numpy())
    return np.stack(out, axis=1)  # (k, z, y, x)


def test_a_tile_is_its_slices_batched():
    torch.manual_seed(3)
    network = LightUNet(1, 4, features_per_stage=(8, 16), strides=((1, 1), (2, 2))).eval()
    data = np.random.default_rng(0).normal(size=(1, 6, 16, 24)).astype(np.float32)
    with torch.no_grad():
        tile = network(torch.from_numpy(data)[None])[0].numpy()
    np.testing.assert_allclose(tile, slice_loop(network, data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slices", [5, 12, 41])  # shorter than, as long as, and over three tiles of 12
def test_sliding_window_equals_a_slice_loop(light_folder, slices):
    """Overlapping tiles along z, blended: every slice still sees its true neighbours."""
    plan = load_plan(light_folder)
    network = load_network(plan, 0)
    data = np.random.default_rng(slices).normal(size=(1, slices, 64, 64)).astype(np.float32)
    backend = TorchBackend([network], plan.patch_zyx, plan.num_classes, z_halo=plan.z_halo)
    assert plan.z_halo == 1 and plan.patch_divisor_zyx == (1, 16, 16)
    got = predict_logits(data, backend, step_size=0.5)
    np.testing.assert_allclose(got, slice_loop(network, data), rtol=1e-4, atol=1e-4)
    labels = predict_logits(data, backend, step_size=0.5, labels=True)
    np.testing.assert_array_equal(labels, got.argmax(0))


def test_openvino_runs_it_as_torch_does(light_folder):
    from flarebox.backends import load_backend
    from flarebox_tools.convert import convert_model

    convert_model(light_folder)
    plan = load_plan(light_folder)
    data = np.random.default_rng(7).normal(size=(1, 30, 48, 48)).astype(np.float32)
    reference = slice_loop(load_network(plan, 0), data)
    backend = load_backend(plan, precision="f32")
    for patch in [(12, 48, 48), (16, 48, 48), (30, 48, 48)]:  # tiles fitted to the plane, 1 to 3 along z
        got = predict_logits(data, backend.for_patch(patch), step_size=0.5)
        np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-3)


def test_multiply_accumulates_match_the_published_count():
    """1.29 GFLOPs a 192x192 slice published; ours counted convolution by convolution."""
    network = LightUNet(1, 14).eval()
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs += output[0].numel() * per_output
        elif isinstance(module, torch.nn.ConvTranspose2d):
            macs += inputs[0][0].numel() * module.out_channels * math.prod(module.kernel_size)

    hooks = [m.register_forward_hook(count) for m in network.modules()]
    with torch.no_grad():
        network.forward_slices(torch.zeros(1, 3, 192, 192))
    for hook in hooks:
        hook.remove()
    print(f"LightUNet: {2 * macs / 1e9:.2f} GFLOPs a 192x192 slice (published 1.29)")
    assert 1.0e9 < 2 * macs < 1.5e9


def test_the_engine_runs_it_from_a_task_config_and_closes_its_labels(light_folder, tmp_path):
    """A task config selects the 2.5D model (OpenVINO, fitted tiles, body crop) like any other, and
    its [postprocess] closing runs on the result."""
    from flarebox import io
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor
    from flarebox.postprocess import close_labels
    from flarebox_tools.convert import convert_model
    from flarebox_tools.synthetic import ct_like, write_image

    if not (light_folder / "openvino" / "manifest.json").is_file():
        convert_model(light_folder)
    volume = io.read_image(write_image(tmp_path / "ct_0000.nii.gz", ct_like((30, 64, 56), seed=3),
                                       spacing_xyz=(2.5, 2.5, 2.5)))
    sections = {"model": {"folder": str(light_folder)},
                "preprocess": {"body_threshold": -500},
                "inference": {"backend": "openvino", "precision": "f32", "fit_patch": True}}
    plain = Predictor.from_config(from_dict(sections, tmp_path)).segment(volume)
    closed = Predictor.from_config(from_dict({**sections, "postprocess": {"closing": 1}}, tmp_path)).segment(volume)
    assert plain.shape == volume.array_zyx.shape and plain.max() > 0
    assert not np.array_equal(plain, closed)  # random weights: ragged labels, which the closing changes
    np.testing.assert_array_equal(closed, close_labels(plain, 1))
