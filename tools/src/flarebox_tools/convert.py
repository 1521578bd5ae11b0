"""Convert a model folder's torch checkpoints to OpenVINO IR (fixed input shape = the patch).

Writes `openvino/fold_<k>_f32.xml/.bin` (f32 weights; bf16 is chosen at compile time) and, with
INT8, `openvino/fold_<k>_int8.xml/.bin` quantised by NNCF post-training quantisation, calibrated on
patches drawn from given images after the model's own preprocessing. `overflow_fix` is NNCF's
setting for CPUs without VNNI, whose 8-bit products are summed in saturating 16 bits: "enable" (our
default) quantises every layer's weights to 7 bits so that no sum can saturate, "first_layer"
(NNCF's default) only the first layer's, "disable" none. With "enable" an INT8 IR gives the same
result on every CPU, VNNI or not; with "first_layer" the Task 2 demo model lost 0.34 / 0.81 DSC points
(phantoms / real CT) against f32 on AVX2 kernels and 0.00 / 0.73 on VNNI ones, with "enable" 0.19 /
-0.11 on both (docs/benchmarks.md). The manifest records the setting; `precision = "auto"` runs an
IR quantised otherwise in f32 on a CPU without VNNI (flarebox/cpu.py). `openvino/manifest.json`
records the sha256 of every file, which the OpenVINO backend checks before it runs an IR. After
conversion the model needs no torch at run time.

An INT8 IR is also run once, in a child process held to OpenVINO's AVX2 kernels
(ONEDNN_MAX_CPU_ISA=AVX2: what a CPU without VNNI runs), on an oblong tile: OpenVINO 2025's INT8
kernels for AVX2 crashed (SIGSEGV) on the lightweight 2.5D network's tiles that were not square,
while its f32 and VNNI kernels ran them. The manifest records the outcome (`int8_without_vnni`),
and `precision = "auto"` runs f32 on a CPU without VNNI where it was not "ok".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox.models import ModelPlan, load_network, load_plan, sha256
from flarebox.preprocess import preprocess
from flarebox.sliding_window import pad_to_patch, tile_starts

log = logging.getLogger("flarebox")
OVERFLOW_FIX = {"enable": "enable", "first_layer": "first_layer_only", "disable": "disable"}  # NNCF's values


def calibration_tiles(
    plan: ModelPlan, images: Iterable[Path], tiles_per_image: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """Patches of preprocessed images at sliding-window positions, the inputs INT8 will see."""
    rng = np.random.default_rng(seed)
    tiles = []
    for path in images:
        volume = io.read_image(Path(path))
        data = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, plan, resampler="auto").data
        data, _ = pad_to_patch(data, plan.patch_zyx)
        starts = [np.array(s) for s in tile_starts(data.shape[1:], plan.patch_zyx, 0.5)]
        for _ in range(tiles_per_image):
            corner = [int(rng.choice(s)) for s in starts]
            region = tuple(slice(c, c + p) for c, p in zip(corner, plan.patch_zyx, strict=True))
            tiles.append(np.ascontiguousarray(data[(slice(None), *region)])[None])
    return tiles


_RUN_ONE_TILE = """
import sys
import numpy as np
import openvino as ov
model = ov.Core().read_model(sys.argv[1])
shape = [int(v) for v in sys.argv[2:]]
model.reshape({0: shape})
compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
compiled.create_infer_request().infer({0: np.random.default_rng(0).normal(size=shape).astype(np.float32)})
"""


def check_without_vnni(xml: Path, plan: ModelPlan) -> str:
    """"ok" when the IR compiles and runs one oblong tile on OpenVINO's AVX2 kernels, else what
    went wrong (in a child process: a crash must not take the conversion with it)."""
    dz, dy, dx = plan.patch_divisor_zyx
    shape = [1, plan.num_input_channels, max(dz, 2 * plan.z_halo + 2), 5 * dy, 4 * dx]
    try:
        done = subprocess.run([sys.executable, "-c", _RUN_ONE_TILE, str(xml), *map(str, shape)],
                              env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timed out"
    if done.returncode < 0:
        return f"crashed (signal {-done.returncode})"
    if done.returncode > 0:
        return f"failed ({done.stderr.decode(errors='replace').strip().splitlines()[-1:]})"
    return "ok"


def convert_model(
    folder: str | Path,
    *,
    configuration: str = "3d_fullres",
    folds: tuple[int, ...] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    calibration_images: Iterable[Path] = (),
    tiles_per_image: int = 4,
    overflow_fix: str = "enable",
) -> Path:
    """Write the IR files (and INT8 ones when calibration images are given); returns the manifest path."""
    import openvino as ov
    import torch

    plan = load_plan(folder, configuration)
    folds = folds if folds is not None else plan.folds
    out_dir = plan.folder / "openvino"
    out_dir.mkdir(exist_ok=True)
    calibration_images = list(calibration_images)
    tiles = calibration_tiles(plan, calibration_images, tiles_per_image) if calibration_images else []
    shape = (1, plan.num_input_channels, *plan.patch_zyx)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    # A 2.5D network reshapes its tile into a batch of slices: that reshape must follow the tile's
    # shape, which the engine sets at compile time, so its z, y and x stay dynamic in the IR.
    declared = ov.PartialShape([1, shape[1], -1, -1, -1]) if plan.z_halo else ov.PartialShape(list(shape))
    checks: list[str] = []  # each INT8 IR on OpenVINO's AVX2 kernels
    for fold in folds:
        network = load_network(plan, fold, checkpoint)
        with torch.no_grad():
            model = ov.convert_model(network, example_input=torch.zeros(shape), input=[declared])
        written = [out_dir / f"fold_{fold}_f32.xml"]
        ov.save_model(model, written[0], compress_to_fp16=False)
        if tiles:
            import nncf
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

            advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX[overflow_fix]))
            quantized = nncf.quantize(model, nncf.Dataset(tiles), subset_size=len(tiles),
                                      advanced_parameters=advanced)
            written.append(out_dir / f"fold_{fold}_int8.xml")
            ov.save_model(quantized, written[1], compress_to_fp16=False)
            checks.append(check_without_vnni(written[1], plan))
            if checks[-1] != "ok":
                log.warning("fold %d: the INT8 IR %s on OpenVINO's AVX2 kernels: `auto` runs f32 on CPUs "
                            "without VNNI", fold, checks[-1])
        for xml in written:
            for part in (xml, xml.with_suffix(".bin")):
                manifest["files"][part.name] = sha256(part)
        log.info("fold %d: wrote %s", fold, ", ".join(p.name for p in written))
    manifest["input_shape"] = list(shape)
    if tiles:
        manifest["int8_overflow_fix"] = overflow_fix
        manifest["int8_without_vnni"] = next((c for c in checks if c != "ok"), "ok")
    manifest["openvino"] = ov.__version__
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools convert", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder")
    parser.add_argument("--folds", type=int, nargs="+")
    parser.add_argument("--calibration", nargs="*", default=[], help="images (_0000.nii.gz) for INT8 calibration")
    parser.add_argument("--calibration-dir", help="a folder of calibration images")
    parser.add_argument("--tiles-per-image", type=int, default=4)
    parser.add_argument("--overflow-fix", default="enable", choices=sorted(OVERFLOW_FIX),
                        help="NNCF's INT8 setting for CPUs without VNNI (see the module's docstring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    images = [Path(p) for p in args.calibration]
    if args.calibration_dir:
        images += sorted(Path(args.calibration_dir).glob("*.nii.gz"))
    manifest = convert_model(args.model, folds=tuple(args.folds) if args.folds else None,
                             calibration_images=images, tiles_per_image=args.tiles_per_image,
                             overflow_fix=args.overflow_fix)
    log.info("wrote %s", manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
