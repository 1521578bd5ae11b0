"""nnU-Net v2 itself on a trained-model folder: the test-only reference for parity and benchmarks.

Run with the nnU-Net environment's python (.venv-nnunet, make_nnunet_env.sh); the engine never
imports it. Three modes, all on one fold, CPU, Gaussian weighting, mirroring off unless asked:

  logits (default)   --input pre.npy --output logits.npy [--step 0.5] [--mirroring]
        nnUNetPredictor.predict_sliding_window_return_logits on a preprocessed (c, z, y, x) array;
        saves the (k, z, y, x) logits as float32 (nnU-Net accumulates them in float16 on the CPU;
        --float32-accumulation switches that accumulator to float32 to isolate its rounding).
  --preprocess-only  --image X_0000.nii.gz --output pre.npy [--properties pre.json]
        nnU-Net's own preprocessing for the model (the configuration's preprocessor class,
        DefaultPreprocessor.run_case: transpose, crop to nonzero, normalise, resample); saves the
        (c, z, y, x) float32 array and its properties as JSON (spacing, sitk_stuff,
        shape_before_cropping, bbox_used_for_cropping, shape_after_cropping_and_before_resampling,
        plus preprocessed_shape).
  --predict-file X_0000.nii.gz --out X.nii.gz
        the full prediction of one file as nnU-Net's predict_from_files_sequential does it
        (preprocess, sliding window, export_prediction_from_logits), without its side files;
        prints the wall time of each stage and of the whole, model loading included.

    python nnunet_logits.py --model-dir M [--fold 0] MODE-ARGS [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def build_predictor(model_dir: str, fold: int, step: float, mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(fold,), checkpoint_name="checkpoint_final.pth")
    return predictor


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def preprocess(predictor, image: str) -> tuple[np.ndarray, dict]:
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _seg, properties = preprocessor.run_case([image], None, predictor.plans_manager,
                                                   predictor.configuration_manager, predictor.dataset_json)
    return data.astype(np.float32, copy=False), properties


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring on the checkpoint's axes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--input", help="logits mode: preprocessed (c, z, y, x) .npy")
    parser.add_argument("--output", help="logits mode: logits .npy; --preprocess-only: preprocessed .npy")
    parser.add_argument("--float32-accumulation", action="store_true",
                        help="accumulate in float32 instead of nnU-Net's float16 (its Gaussian map stays float16)")
    parser.add_argument("--preprocess-only", action="store_true")
    parser.add_argument("--image", help="--preprocess-only: the raw X_0000.nii.gz")
    parser.add_argument("--properties", help="--preprocess-only: JSON of the properties (default: OUTPUT.json)")
    parser.add_argument("--predict-file", metavar="IMAGE", help="full prediction of one raw image")
    parser.add_argument("--out", help="--predict-file: the segmentation to write (.nii.gz)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    predictor = build_predictor(args.model_dir, args.fold, args.step, args.mirroring)
    loaded = time.perf_counter()

    if args.preprocess_only:
        if not (args.image and args.output):
            parser.error("--preprocess-only needs --image and --output")
        data, properties = preprocess(predictor, args.image)
        np.save(args.output, data)
        properties = {**properties, "preprocessed_shape": list(data.shape[1:])}
        json_path = Path(args.properties or Path(args.output).with_suffix(".json"))
        json_path.write_text(json.dumps(_jsonable(properties), indent=2))
        return

    if args.predict_file:
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        ending = predictor.dataset_json["file_ending"]
        if not (args.out and args.out.endswith(ending)):
            parser.error(f"--predict-file needs --out ending in {ending}")
        data, properties = preprocess(predictor, args.predict_file)
        preprocessed = time.perf_counter()
        # predict_logits_from_preprocessed_data: nnU-Net's own entry (it caps torch threads at 8)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        predicted = time.perf_counter()
        export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                      predictor.dataset_json, args.out[: -len(ending)], False)
        done = time.perf_counter()
        print(f"nnU-Net {Path(args.predict_file).name}: load {loaded - start:.2f}s, preprocess "
              f"{preprocessed - loaded:.2f}s {tuple(data.shape[1:])}, predict {predicted - preprocessed:.2f}s, "
              f"export {done - predicted:.2f}s, total {done - start:.2f}s")
        return

    if not (args.input and args.output):
        parser.error("logits mode needs --input and --output")
    if args.float32_accumulation:
        # nnU-Net allocates its accumulators with dtype=torch.half at call time, while compute_gaussian's
        # float16 default was bound at import: rebinding torch.half changes only the accumulators.
        torch.half = torch.float32
    data = torch.from_numpy(np.load(args.input))
    logits = predictor.predict_sliding_window_return_logits(data)
    np.save(args.output, logits.float().cpu().numpy())


if __name__ == "__main__":
    main()
