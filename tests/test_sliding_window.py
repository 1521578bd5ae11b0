"""sliding_window: nnU-Net tile placement, Gaussian weights, padding, stitching, mirroring."""

from __future__ import annotations

import numpy as np
import pytest

from flarebox.sliding_window import (
    argmax_classes,
    gaussian_importance,
    pad_to_patch,
    predict_logits,
    tile_starts,
)


class LinearBackend:
    """A 'network' whose logits are known: channel k = (k + 1) * input + k. Stitching must reproduce it."""

    def __init__(self, patch, num_classes=3):
        self.patch_zyx, self.num_classes, self.calls, self.z_halo = tuple(patch), num_classes, 0, 0

    def predict(self, tile):
        self.calls += 1
        assert tile.shape[2:] == self.patch_zyx and tile.dtype == np.float32
        return np.concatenate([(k + 1) * tile + k for k in range(self.num_classes)], axis=1)


def test_tile_starts_match_nnunet_placement():
    # image 110, patch 64, step 0.5: nnU-Net's own docstring example gives 0, 23, 46
    assert tile_starts((110, 64, 200), (64, 64, 64), 0.5) == [[0, 23, 46], [0], [0, 27, 54, 82, 109, 136]]
    assert tile_starts((64, 65, 40), (64, 64, 40), 1.0) == [[0], [0, 1], [0]]
    with pytest.raises(ValueError):
        tile_starts((10, 10, 10), (20, 10, 10), 0.5)


def test_gaussian_is_nnunets_half_precision_map():
    g = gaussian_importance((9, 16, 12))
    assert g.shape == (9, 16, 12) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g[4, 8, 6] == g.max()
    assert g.min() > 0
    # sigma = patch / 8: one sigma from the centre along x the weight is exp(-1/2) of the peak
    big = gaussian_importance((64, 64, 64))
    assert big[32, 32, 40] / big[32, 32, 32] == pytest.approx(np.exp(-0.5), rel=0.02)
    # far from the centre the map is float16's smallest step of a peak of 10, not the true Gaussian
    assert big[0, 0, 0] == pytest.approx(float(np.float16(6e-8)) / 10, rel=0.01)


def test_pad_to_patch_splits_padding_and_undoes_it():
    data = np.ones((1, 5, 20, 7), np.float32)
    padded, undo = pad_to_patch(data, (8, 16, 10))
    assert padded.shape == (1, 8, 20, 10)
    assert padded[0, :1].sum() == 0 and padded[0, 6:].sum() == 0  # 3 voxels: 1 before, 2 after
    np.testing.assert_array_equal(padded[undo], data)
    sides, _ = pad_to_patch(data, (8, 16, 10), ((-6.25, 0.0), (0.0, 0.0), (0.0, -2.5)))
    # z before / after, and x before / after (where two pads meet, the later axis's value stands)
    assert (sides[0, :1, :, 1:8] == -6.25).all() and (sides[0, 6:, :, 1:8] == 0).all()
    assert (sides[0, :, :, :1] == 0).all() and (sides[0, :, :, 8:] == -2.5).all()
    np.testing.assert_array_equal(sides[undo], data)


def test_the_network_sees_the_pad_value_beyond_a_small_image():
    seen = []

    class Recording(LinearBackend):
        def predict(self, tile):
            seen.append(tile.copy())
            return super().predict(tile)

    data = np.ones((1, 10, 12, 14), np.float32)
    predict_logits(data, Recording((16, 16, 16)), pad_values=((0.0, 0.0), (-3.0, -3.0), (0.0, 0.0)))
    (tile,) = seen
    # y padded 2 + 2 with -3 (but for where x's padding, 1 + 1 with 0, crosses it)
    assert (tile == -3.0).sum() == 16 * 4 * 14 and (tile == 1).sum() == data.size


@pytest.mark.parametrize("shape", [(1, 30, 50, 41), (1, 7, 13, 9), (1, 16, 16, 16)])
def test_stitched_logits_equal_the_pointwise_function(shape):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    backend = LinearBackend((16, 16, 16))
    logits = predict_logits(data, backend, step_size=0.5)
    expected = np.concatenate([(k + 1) * data + k for k in range(3)])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_eight_flips_and_on_tile_reports_progress():
    data = np.random.default_rng(1).normal(size=(1, 16, 16, 16)).astype(np.float32)
    backend = LinearBackend((16, 16, 16), num_classes=2)
    seen = []
    logits = predict_logits(data, backend, mirroring=True, on_tile=lambda done, total: seen.append((done, total)))
    assert backend.calls == 8 and seen == [(1, 1)]
    np.testing.assert_allclose(logits[1], 2 * data[0] + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mirroring", "slices"), [(False, 11), (True, 11), (False, 45), (False, 5)])
def test_device_accumulation_equals_host(mirroring, slices):
    """The torch accumulation path (a GPU's, run here on the CPU) sums exactly what the host path sums."""
    torch = pytest.importorskip("torch")
    from flarebox.backends.torch_runtime import TorchBackend

    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    backend = TorchBackend([net.eval()], (8, 16, 12), 3, device="cpu")
    data = np.random.default_rng(1).normal(size=(2, slices, 37, 30)).astype(np.float32)
    host = predict_logits(data, backend, mirroring=mirroring)
    device = predict_logits(data, backend, mirroring=mirroring, accumulate="device")  # a band rolls down z
    assert device.shape == host.shape == (3, slices, 37, 30)
    np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="accumulate"):
        predict_logits(data, backend, accumulate="gpu")
    assert backend.accumulation_place((11, 37, 30), 2**40) == "host"  # off the GPU there is no choice


def test_fitted_patch_shrinks_only_where_the_image_is_smaller():
    from flarebox.sliding_window import fitted_patch

    # Task 2's patch and strides (z divides by 8, y and x by 32); a 2.5 mm abdomen of 300 x 150 x 131
    assert fitted_patch((300, 150, 131), (40, 224, 192), (8, 32, 32)) == (40, 160, 160)
    assert fitted_patch((20, 300, 300), (40, 224, 192), (8, 32, 32)) == (24, 224, 192)
    assert fitted_patch((40, 224, 192), (40, 224, 192), (8, 32, 32)) == (40, 224, 192)
    assert fitted_patch((1, 1, 1), (40, 224, 192), (8, 32, 32)) == (8, 32, 32)


@pytest.mark.parametrize("accumulate", ["host", "device"])
def test_labels_are_the_argmax_of_the_logits_without_holding_them(accumulate):
    torch = pytest.importorskip("torch")
    from flarebox.backends.torch_runtime import TorchBackend

    torch.manual_seed(0)
    backend = TorchBackend([torch.nn.Conv3d(1, 4, 3, padding=1).eval()], (8, 16, 16), 4, device="cpu")
    data = np.random.default_rng(2).normal(size=(1, 29, 40, 21)).astype(np.float32)
    logits = predict_logits(data, backend, accumulate=accumulate)
    labels = predict_logits(data, backend, accumulate=accumulate, labels=True)
    assert labels.dtype == np.uint8 and labels.shape == (29, 40, 21)
    np.testing.assert_array_equal(labels, logits.argmax(0))


@pytest.mark.parametrize(("slices", "step"), [(8, 0.5), (29, 0.3), (29, 0.5), (40, 0.75), (61, 0.75), (37, 1.0),
                                               (50, 0.9)])
@pytest.mark.parametrize("mirroring", [False, True])
def test_a_column_of_tiles_labels_as_the_band_does(monkeypatch, slices, step, mirroring):
    # tiles that span the y-x plane: labels come from a carry as deep as the overlaps (three tiles
    # deep below step 0.5), never from the band; they must be the argmax of the stitched logits
    torch = pytest.importorskip("torch")
    from flarebox import sliding_window
    from flarebox.backends.torch_runtime import TorchBackend

    torch.manual_seed(1)
    backend = TorchBackend([torch.nn.Conv3d(1, 5, 3, padding=1).eval()], (8, 16, 12), 5, device="cpu")
    data = np.random.default_rng(3).normal(size=(1, slices, 16, 10)).astype(np.float32)  # x padded to 12
    logits = predict_logits(data, backend, step_size=step, mirroring=mirroring)
    seen = []

    def no_band(*args):
        raise AssertionError("a column of tiles went through the band")

    monkeypatch.setattr(sliding_window, "_band_sums", no_band)
    labels = predict_logits(data, backend, step_size=step, mirroring=mirroring, labels=True,
                            on_tile=lambda done, total: seen.append(done))
    assert labels.dtype == np.uint8 and labels.shape == (slices, 16, 10)
    np.testing.assert_array_equal(labels, logits.argmax(0))
    assert seen == list(range(1, len(tile_starts((slices,), (8,), step)[0]) + 1))


@pytest.mark.parametrize("shape", [(14, 20, 33, 17), (3, 1, 5, 4), (2, 7, 1, 1)])
def test_argmax_classes_is_numpy_argmax_ties_included(shape):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=shape).astype(np.float32)  # few values: many ties
    labels = argmax_classes(scores)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=0))
    scores = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(argmax_classes(scores[:, 1:]), np.argmax(scores[:, 1:], axis=0))  # a view


@pytest.mark.parametrize("patch", [(40, 224, 192), (96, 160, 160), (40, 192, 224), (7, 9, 4), (32, 128, 160)])
def test_gaussian_importance_is_scipy_gaussian_filter_bit_for_bit(patch):
    # nnU-Net's recipe with scipy itself (test-only here): impulse, gaussian_filter, /max*10, float16
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch)] = 1.0
    reference = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    half = (reference * (10.0 / reference.max())).astype(np.float16)
    half[half == 0] = half[half > 0].min()
    np.testing.assert_array_equal(gaussian_importance(patch), half.astype(np.float32) / np.float32(10.0))
