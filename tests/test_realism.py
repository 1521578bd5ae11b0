"""training.realism: per-organ statistics of a CT and its labels, and the comparison table."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from flarebox_tools.training.realism import compare, organ_statistics
from tests.conftest import REAL_CT


def _image(array_zyx: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    return image


def test_organ_statistics_on_a_hand_made_case():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 5:10, 2:6] = 1  # liver: 6 x 5 x 4 voxels of 8 mm3
    labels[2:8, 5:10, 6:8] = 2  # right kidney, touching it
    labels[2:8, 12:14, 10:12] = 5  # aorta, 7 voxels further back and 8 to the left of the liver
    hu = np.where(labels == 1, 60, np.where(labels == 2, 30, -100)).astype(np.int16)
    stats = organ_statistics(_image(hu), _image(labels))
    assert set(stats) == {"liver", "right_kidney", "aorta"}
    liver = stats["liver"]
    assert liver["hu_mean"] == 60 and liver["hu_sd"] == 0
    assert abs(liver["volume_cm3"] - 6 * 5 * 4 * 8 / 1000) < 1e-9
    assert liver["offset_from_aorta_mm"] == (-14.0, -11.0)  # centroids (x 3.5 vs 10.5, y 7 vs 12.5) x 2 mm
    assert liver["touches"] == ["right_kidney"] and stats["aorta"]["touches"] == []


def test_compare_puts_a_scan_beside_phantoms(tmp_path):
    """A 'real' scan (here the sample CT with a hand-made liver label) beside two phantoms: the organs
    of either side get a row, and what the scan lacks says so."""
    from flarebox_tools.phantoms import write_dataset

    phantoms = write_dataset(tmp_path / "ph", 2, 0, spacing_zyx_mm=(4.0, 4.0, 4.0))
    ct = sitk.ReadImage(str(REAL_CT))
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[10:20, 30:60, 20:50] = 1
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(ct)
    sitk.WriteImage(label_image, str(tmp_path / "labels.nii.gz"))
    table = compare(REAL_CT, tmp_path / "labels.nii.gz", phantoms, 2)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"liver", "spleen", "aorta"} <= set(rows)
    assert "absent" in rows["spleen"] and "absent" not in rows["liver"]
