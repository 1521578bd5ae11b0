"""Export: bring the network's output back to the input's exact voxel grid as uint8 labels.

Undoes preprocessing in reverse: resample to the cropped original shape, put the crop back into
the full (transposed) grid with background around it, and transpose back. Two ways to resample:

- 'labels': argmax at network resolution, then nearest-neighbour labels to full resolution.
  Fast; boundaries are as coarse as the network's grid.
- 'logits': trilinear resampling of the logits, then argmax (what nnU-Net does, with linear
  instead of its cubic in-plane interpolation). Smooth boundaries, but it resamples every class at
  full resolution: slower than the whole INT8 network (docs/benchmarks.md, engine choices). Done in
  slabs of output slices so memory stays at one slab of full-resolution logits.

In 'labels' mode a single model's result can also wait, as `Labels`, until it is written: the
writer then takes the full grid a few slices at a time (`Labels.slabs`), so the 78 MB of a
512x512x300 label map are never held, nor first touched, at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flarebox.config import EXPORT_MODES
from flarebox.preprocess import Preprocessed
from flarebox.resample import linear_taps, nearest_indices, resize_linear, resize_nearest


def _logits_to_labels_trilinear(
    logits: np.ndarray, shape_zyx: tuple[int, int, int], resampler: str, slab: int
) -> np.ndarray:
    """Separable trilinear resize (in-plane per source slice, then linear along z) fused with argmax."""
    n_out = shape_zyx[0]
    low, high, frac = linear_taps(logits.shape[1], n_out)
    labels = np.empty(shape_zyx, dtype=np.uint8)
    for start in range(0, n_out, slab):
        stop = min(start + slab, n_out)
        src_lo, src_hi = int(low[start]), int(high[stop - 1]) + 1
        planes = resize_linear(logits[:, src_lo:src_hi], (src_hi - src_lo, *shape_zyx[1:]), engine=resampler)
        a = planes[:, low[start:stop] - src_lo]
        b = planes[:, high[start:stop] - src_lo]
        w = frac[start:stop, None, None]
        a *= 1 - w
        b *= w
        a += b
        labels[start:stop] = np.argmax(a, axis=0)
    return labels


@dataclass(frozen=True)
class Labels:
    """A case's uint8 labels on its input's (z, y, x) grid, made when wanted: `array()` whole, or
    `slabs()` a few z-slices at a time (`Labels.of` for the network's labels; `Labels(array)` for
    labels already on the input's grid).

    grid: (z, y, x) labels on the preprocessed grid, or on the input's grid where `bbox` is None.
    bbox, shape_before_crop, transpose_backward: the way back, from `Preprocessed` (only these: a
        case waiting to be written does not keep its preprocessed voxels alive).
    """

    grid: np.ndarray
    bbox: tuple[tuple[int, int], ...] | None = None
    shape_before_crop: tuple[int, int, int] | None = None
    transpose_backward: tuple[int, int, int] = (0, 1, 2)

    @classmethod
    def of(cls, grid: np.ndarray, pre: Preprocessed) -> Labels:
        """The network's (z, y, x) labels on the preprocessed grid, to go back the way `pre` came."""
        return cls(grid.astype(np.uint8, copy=False), pre.bbox, pre.shape_before_crop, pre.transpose_backward)

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        if self.shape_before_crop is None:
            return self.grid.shape
        return tuple(self.shape_before_crop[axis] for axis in self.transpose_backward)

    def array(self) -> np.ndarray:
        """The whole label map."""
        if self.shape_before_crop is None:
            return self.grid
        full = np.zeros(self.shape_before_crop, dtype=np.uint8)  # background around the crop
        self._fill(full, 0)
        return np.ascontiguousarray(np.transpose(full, self.transpose_backward))

    def slabs(self, slices: int = 16) -> Iterator[np.ndarray]:
        """The label map as consecutive blocks of `slices` whole z-slices, in file order. Each block
        is the same reused buffer, valid until the next is asked for: a few MB, warm in the cache,
        instead of a fresh full grid whose pages are first touched."""
        if self.shape_before_crop is None or tuple(self.transpose_backward) != (0, 1, 2):
            whole = self.array()  # a slab of the input's z is not one of the network's: no gain
            for start in range(0, whole.shape[0], slices):
                yield whole[start : start + slices]
            return
        n_z, n_y, n_x = self.shape_before_crop
        buffer = np.zeros((min(slices, n_z), n_y, n_x), dtype=np.uint8)
        for start in range(0, n_z, slices):
            block = buffer[: min(slices, n_z - start)]
            self._fill(block, start)
            yield block

    def _fill(self, out: np.ndarray, start: int) -> None:
        """Slices start..start+len(out) of the (transposed) grid before the crop, into `out`, whose
        voxels outside the crop's y-x box must be 0 already; slices outside the crop's z are zeroed."""
        assert self.bbox is not None
        (z0, z1), (y0, y1), (x0, x1) = self.bbox
        box = out[:, y0:y1, x0:x1]
        inside = slice(*np.clip([z0 - start, z1 - start], 0, len(out)))
        box[: inside.start] = 0
        box[inside.stop :] = 0
        if inside.stop <= inside.start:
            return
        crop = (z1 - z0, y1 - y0, x1 - x0)
        rows = nearest_indices(self.grid.shape[0], crop[0])[start + inside.start - z0 : start + inside.stop - z0]
        planes = np.take(self.grid, rows, axis=0)
        resize_nearest(planes, (len(rows), *crop[1:]), out=box[inside])


def to_original_grid(
    prediction: np.ndarray,
    pre: Preprocessed,
    *,
    mode: str = "labels",
    resampler: str = "auto",
    slab: int = 8,
) -> np.ndarray:
    """(k, z, y, x) logits, or (z, y, x) labels already argmaxed, on the preprocessed grid -> uint8
    labels on the original (z, y, x) grid.

    mode: 'labels' (fast, nearest) or 'logits' (smooth, trilinear on logits; needs logits); see the
        module docstring.
    resampler: engine for the 'logits' mode ('auto', 'torch', 'numpy').
    slab: output slices per step in 'logits' mode (memory ~ k * slab * y * x * 4 bytes).
    """
    if mode == "labels":
        grid = prediction if prediction.ndim == 3 else np.argmax(prediction, axis=0)
    elif mode == "logits":
        if prediction.ndim != 4:
            raise ValueError("export mode 'logits' needs (k, z, y, x) logits, not labels")
        # labels of the crop at full resolution: the way back is then only the crop and transpose
        grid = _logits_to_labels_trilinear(prediction, tuple(b - a for a, b in pre.bbox), resampler, slab)
    else:
        raise ValueError(f"export mode {mode!r} is not one of {EXPORT_MODES}")
    return Labels.of(grid, pre).array()
