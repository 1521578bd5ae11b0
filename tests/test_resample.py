"""resample: the linear engines against each other and scipy, nearest-neighbour gathers."""

from __future__ import annotations

import numpy as np
import pytest

from flarebox.resample import nearest_indices, resize_linear, resize_nearest


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_linear_resize_engines_agree_and_keep_constants(engine):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 9, 17, 13)).astype(np.float32)
    out = resize_linear(data, (5, 31, 8), engine=engine)
    ref = resize_linear(data, (5, 31, 8), engine="torch")
    assert out.shape == (2, 5, 31, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_allclose(resize_linear(np.full((4, 4, 4), 3.0), (7, 2, 9), engine=engine), 3.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 23, 31), (97, 70, 45), (13, 150, 90), (1, 1, 1)])
def test_numpy_resize_matches_scipy_zoom(shape):
    # an independent implementation of the same sampling (scipy's grid_mode, edge clamped), on
    # volumes the NumPy engine splits over threads along z or, when z itself changes, along y
    from scipy import ndimage

    data = np.random.default_rng(1).normal(size=(40, 70, 90)).astype(np.float32)
    zoom = [o / i for o, i in zip(shape, data.shape, strict=True)]
    expected = ndimage.zoom(data, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    assert expected.shape == shape
    np.testing.assert_allclose(resize_linear(data, shape, engine="numpy"), expected, atol=2e-5)


def test_nearest_resize_round_trip():
    labels = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    up = resize_nearest(labels, (8, 15, 12))
    assert up.shape == (8, 15, 12)
    np.testing.assert_array_equal(up[::2, 1::3, ::2], labels)


@pytest.mark.parametrize("shape", [(9, 15, 12), (4, 15, 12), (9, 5, 6), (4, 5, 13), (4, 5, 6), (3, 2, 6)])
def test_nearest_resize_equals_one_gather_into_a_view(shape):
    labels = np.random.default_rng(2).integers(0, 14, (4, 5, 6)).astype(np.uint8)
    index = [nearest_indices(n_in, n_out) for n_in, n_out in zip(labels.shape, shape, strict=True)]
    expected = labels[np.ix_(*index)]
    np.testing.assert_array_equal(resize_nearest(labels, shape), expected)
    full = np.full((shape[0] + 2, shape[1] + 3, shape[2] + 1), 99, np.uint8)
    resize_nearest(labels, shape, out=full[1:-1, 2:-1, 1:])
    np.testing.assert_array_equal(full[1:-1, 2:-1, 1:], expected)
    full[1:-1, 2:-1, 1:] = 99
    assert (full == 99).all()  # nothing written outside the view
