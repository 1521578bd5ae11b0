"""nnU-Net v2's own predictor on a trained-model folder: the test-only reference for parity.

Run with the nnU-Net environment's python (.venv-nnunet), never imported by the engine:
    python nnunet_logits.py --model-dir M --input pre.npy --output logits.npy [--step 0.5]
It loads the folder with nnUNetPredictor.initialize_from_trained_model_folder (CPU, Gaussian
weighting, no mirroring), loads the fold's weights, and runs nnU-Net's sliding window on the given
preprocessed (c, z, y, x) array, saving its (k, z, y, x) logits as float32.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--mirroring", action="store_true")
    parser.add_argument("--float32-accumulation", action="store_true",
                        help="accumulate in float32 instead of nnU-Net's float16 (its Gaussian map stays float16)")
    args = parser.parse_args()
    if args.float32_accumulation:
        # nnU-Net allocates its accumulators with dtype=torch.half at call time; its Gaussian map's
        # float16 default was bound at import. Test-only switch to isolate the accumulator's error.
        torch.half = torch.float32

    torch.set_num_threads(max(1, torch.get_num_threads()))
    predictor = nnUNetPredictor(tile_step_size=args.step, use_gaussian=True, use_mirroring=args.mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model_dir, use_folds=(args.fold,),
                                                   checkpoint_name="checkpoint_final.pth")
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    data = torch.from_numpy(np.load(args.input))
    logits = predictor.predict_sliding_window_return_logits(data)
    np.save(args.output, logits.float().cpu().numpy())


if __name__ == "__main__":
    main()
