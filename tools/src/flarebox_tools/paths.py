"""Where the tools find the repository they run from (task folders, bundled weights) and the shared
real CT beside it. The tools are host-side and run from a checkout (`pip install -e tools`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # tools/src/flarebox_tools/paths.py
REAL_DIR = REPO.parent / "shared" / "data" / "real"
REAL_CT, REAL_LABELS = REAL_DIR / "ts_ct_sm_0000.nii.gz", REAL_DIR / "ts_ct_sm.nii.gz"
