"""Proof that nnU-Net v2 itself takes our fixture model folders (tests/nnunet_folders.py).

Run with the nnU-Net environment's python, from anywhere:
    .venv-nnunet/bin/python tests/reference/check_fixtures_with_nnunet.py [--image X_0000.nii.gz] [--quick]

For each fixture (current plans format; PlainConvUNet and ResidualEncoderUNet, tiny and the
published Task 2 network) nnUNetPredictor.initialize_from_trained_model_folder must load it (its
strict load_state_dict checks every weight name and shape), and nnU-Net's own preprocessing,
sliding window and export must turn the real CT into a segmentation on the input's voxel grid.
Legacy (pre-2.3) plans are tried too: nnU-Net must rebuild from them the architecture the current
format states; a legacy ResidualEncoderUNet cannot be built in .venv-nnunet (nnU-Net 2.8 looks it
up under its old module name, and its fallback search imports a timm-based module; timm is left out
of the environment) and is reported as KNOWN. Then nnunet_logits.py's three modes run once as
subprocesses. Exits non-zero if any required check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REAL_CT = Path("/work/shared/data/real/ts_ct_sm_0000.nii.gz")
if not REAL_CT.exists():
    REAL_CT = ROOT / "tests" / "data" / "inputs" / "ts_ct_sm_0000.nii.gz"


def predict_file(model: Path, image: Path, out: Path) -> dict:
    """nnU-Net's one-file path (predict_from_files_sequential without its side files)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    start = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                predictor.configuration_manager, predictor.dataset_json)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                  predictor.dataset_json, str(out)[: -len(".nii.gz")], False)
    return {"seconds": time.perf_counter() - start, "preprocessed": tuple(data.shape), "logits": logits,
            "params": sum(p.numel() for p in predictor.network.parameters()),
            "classes": predictor.label_manager.num_segmentation_heads}


def check_segmentation(out: Path, image: Path, num_classes: int) -> None:
    seg, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert seg.GetSize() == ref.GetSize(), (seg.GetSize(), ref.GetSize())
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing()) and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert np.allclose(seg.GetDirection(), ref.GetDirection())
    labels = np.unique(sitk.GetArrayFromImage(seg))
    assert labels.min() >= 0 and labels.max() < num_classes, labels


def legacy_matches_current(fx, name: str, work: Path) -> None:
    """nnU-Net's own reconstruction of a legacy plans file (ConfigurationManager) must give the
    architecture the current-format fixture writes, class path aside (2.8 maps legacy
    ResidualEncoderUNet to the old module residual_unet)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configs = {}
    for plans_format in ("current", "legacy"):
        folder = fx.write_plans_and_dataset(work / f"{name}_{plans_format}_plans", plans_format=plans_format,
                                            **getattr(fx, name))
        plans = json.loads((folder / "plans.json").read_text())
        configs[plans_format] = PlansManager(plans).get_configuration("3d_fullres").configuration["architecture"]
    current, legacy = configs["current"], configs["legacy"]
    assert legacy["arch_kwargs"] == current["arch_kwargs"], (legacy["arch_kwargs"], current["arch_kwargs"])
    assert list(legacy["_kw_requires_import"]) == list(current["_kw_requires_import"])
    print(f"  {name}: nnU-Net reconstructs the legacy plans to the current architecture "
          f"({legacy['network_class_name'].rsplit('.', 2)[-2]}.{legacy['network_class_name'].rsplit('.', 1)[-1]})")


def run_cli(model: Path, image: Path, work: Path) -> None:
    """nnunet_logits.py's three modes on one model, as the parity tests call them."""
    script = [sys.executable, str(HERE / "nnunet_logits.py"), "--model-dir", str(model),
              "--threads", str(torch.get_num_threads())]
    pre, props, logits, seg = work / "pre.npy", work / "pre.json", work / "logits.npy", work / "cli_seg.nii.gz"
    subprocess.run(script + ["--preprocess-only", "--image", str(image), "--output", str(pre)], check=True)
    subprocess.run(script + ["--input", str(pre), "--output", str(logits)], check=True)
    subprocess.run(script + ["--predict-file", str(image), "--out", str(seg)], check=True)
    data, out = np.load(pre), np.load(logits)
    assert data.dtype == np.float32 and data.ndim == 4 and props.is_file()
    assert out.dtype == np.float32 and out.shape[1:] == data.shape[1:] and np.isfinite(out).all()
    print(f"  nnunet_logits.py: preprocessed {data.shape}, logits {out.shape}, segmentation written")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=REAL_CT)
    parser.add_argument("--quick", action="store_true", help="skip the full-size Task 2 network")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared 2-core machine more threads spin and stall)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tools" / "src"))  # the nnU-Net environment has no flarebox_tools installed
    from flarebox_tools import nnunet_folders as fx

    required = ["TINY_PLAIN", "TINY_RESENC"] + ([] if args.quick else ["FLARE_TASK2_PLAIN"])
    cases = [(name, "current", True) for name in required]
    cases += [("TINY_PLAIN", "legacy", True), ("TINY_RESENC", "legacy", False)]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, plans_format, must_pass in cases:
            model = fx.make_trained_model_folder(work / f"{name}_{plans_format}", seed=1, plans_format=plans_format,
                                                 **getattr(fx, name))
            out = work / f"{name}_{plans_format}.nii.gz"
            try:
                result = predict_file(model, args.image, out)
                check_segmentation(out, args.image, result["classes"])
                logits = result["logits"]
                assert torch.isfinite(logits).all() and logits.shape[0] == result["classes"]
                assert result["params"] == fx.count_parameters(model)
                print(f"OK   {name} ({plans_format} plans): {result['params'] / 1e6:.3f} M parameters, "
                      f"preprocessed {result['preprocessed']}, logits {tuple(logits.shape)} {logits.dtype}, "
                      f"{result['seconds']:.1f} s")
            except Exception as exc:  # noqa: BLE001 - report every fixture, fail at the end
                failures += must_pass
                tag = "FAIL" if must_pass else "KNOWN"
                print(f"{tag} {name} ({plans_format} plans): {type(exc).__name__}: {exc}")
                if must_pass:
                    traceback.print_exc()
        for name in ("TINY_PLAIN", "TINY_RESENC"):
            legacy_matches_current(fx, name, work)
        cli_model = work / "TINY_PLAIN_current"
        run_cli(cli_model, args.image, work)
    print(f"{failures} required check(s) failed" if failures else "all required fixtures load and predict in nnU-Net")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
