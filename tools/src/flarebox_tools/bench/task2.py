"""Task 2 benchmark: stage times, whole-process time, peak RSS and network share, per backend/precision.

    make bench                      # every configuration below on a 512x512x300 phantom and synthetic CT
    make bench BENCH_ARGS="--slices 300 600 --cases phantom --nnunet --seed-script PATH"

The model is the published Task 2 network (PlainConvUNet, 30.7 M parameters) with random weights;
the locate stage's network is the bundled locator (task2_cpu_organs/weights/locator, trained), so
the box it finds, and the tiles that follow, are those of a real run. Two cases, 512x512xS at
0.8x0.8x2.5 mm: "phantom", a synthetic patient scanned from the thorax (20 cm above the diaphragm)
downwards, to the thighs at 300 slices and the knees at 600 (flarebox_tools.phantoms); "synthetic",
an elliptic body with two blobs, the whole length alike. Every configuration runs in a fresh process
(as a container would), timed from process start to exit; peak RSS is the process tree's, sampled
every 20 ms. The CPU's instruction sets are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from flarebox_tools.paths import REPO as ROOT

# backend:precision[:option=value,...]; options: body (crop to voxels above this HU), fit (1: fitted
# tile), step (tile step), locate (network: the bundled locator; model: the organ model coarsened),
# threads (the network's; default: every core), model (light: the bundled lightweight 2.5D network;
# demo: the bundled nnU-Net demo model, 1.5 M parameters; both trained, instead of the published
# network with random weights), close (closing radius, postprocess), forced (1: the 3D-CPS
# forced-spacing rule).
# The last line is Task 2's shipped configuration.
DEFAULT = "openvino:auto:body=-500,fit=1,step=0.75"
CONFIGS = ["openvino:f32", "openvino:bf16", "openvino:int8", "torch:f32", "openvino:int8:body=-500,fit=1",
           DEFAULT, f"{DEFAULT},locate=model", f"{DEFAULT},locate=network", f"{DEFAULT},model=light",
           f"{DEFAULT},locate=network,model=light"]
LOCATOR = ROOT / "task2_cpu_organs" / "weights" / "locator"
BUNDLED = {"light": ROOT / "task2_cpu_organs" / "weights" / "light",
           "demo": ROOT / "task2_cpu_organs" / "weights" / "model"}
CASES = ("phantom", "synthetic")
PHANTOM_SEED = 20_000  # neither a training (0..) nor a demo held-out (10 000..) seed


def synthetic_ct(path: Path, slices: int, seed: int = 0) -> Path:
    from flarebox_tools.synthetic import ct_like, write_image

    if not path.exists():
        write_image(path, ct_like((slices, 512, 512), seed=seed), spacing_xyz=(0.8, 0.8, 2.5))
    return path


def phantom_ct(path: Path, slices: int, labels: Path | None = None) -> Path:
    """A phantom patient scanned from 20 cm above the diaphragm downwards, 512x512xS at 0.8x0.8x2.5 mm."""
    from flarebox_tools import phantoms

    if not path.exists():
        phantom = phantoms.generate_case(PHANTOM_SEED, spacing_zyx_mm=(2.5, 0.8, 0.8), shape_zyx=(slices, 512, 512),
                                         orientation="lps", top_mm=200.0, phase="portal-venous")
        case_id = path.name.removesuffix("_0000.nii.gz")
        phantoms.write_case(phantom, path.parent, labels, case_id, "organs")
    return path


def cpu_line() -> str:
    """The CPU and the instruction sets that decide the network's speed (and OpenVINO's own view)."""
    import openvino as ov

    from flarebox.cpu import cpu_description

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return f"CPU: {cpu_description()}; OpenVINO: {' '.join(capabilities)}"


def prepare(workdir: Path, slices: int, case: str = "synthetic") -> tuple[Path, Path]:
    """The random-weight Task 2 model with f32 and INT8 IR, and the input folder; made once, reused."""
    from flarebox_tools import nnunet_folders
    from flarebox_tools.convert import convert_model

    model = workdir / "task2_model"
    if not (model / "openvino" / "manifest.json").is_file():
        nnunet_folders.make_trained_model_folder(model, **nnunet_folders.FLARE_TASK2_PLAIN)
        calib = synthetic_ct(workdir / "calib_0000.nii.gz", 80, seed=1)
        start = time.perf_counter()
        convert_model(model, calibration_images=[calib], tiles_per_image=8)
        print(f"converted to OpenVINO f32 + INT8 in {time.perf_counter() - start:.1f}s", flush=True)
    inputs = workdir / (f"inputs_{slices}" if case == "synthetic" else f"inputs_{case}_{slices}")
    inputs.mkdir(parents=True, exist_ok=True)
    if case == "synthetic":
        synthetic_ct(inputs / f"ct{slices}_0000.nii.gz", slices)
    else:
        phantom_ct(inputs / f"phantom{slices}_0000.nii.gz", slices, workdir / f"labels_{case}_{slices}")
    return model, inputs


def config_sections(spec: str) -> dict:
    """The [inference] and [preprocess] sections of a `backend:precision[:option=value,...]` spec."""
    backend, precision, options = (spec.split(":") + [""])[:3]
    options = dict(item.split("=") for item in options.split(",") if item)
    inference = {"backend": backend, "precision": precision, "fit_patch": options.get("fit") == "1"}
    if "step" in options:
        inference["step_size"] = float(options["step"])
    if "threads" in options:
        inference["threads"] = int(options["threads"])
    preprocess = {"body_threshold": float(options["body"])} if "body" in options else {}
    if options.get("forced") == "1":
        preprocess["forced_spacing"] = True
    sections: dict = {"inference": inference, "preprocess": preprocess}
    if "model" in options:
        if options["model"] not in BUNDLED:
            raise SystemExit(f"{spec}: model={options['model']}: not one of {', '.join(BUNDLED)}")
        sections["model"] = {"folder": str(BUNDLED[options["model"]])}
    if "close" in options:
        sections["postprocess"] = {"closing": int(options["close"])}
    if options.get("locate") in ("network", "network-z"):  # network-z: crop along z only
        sections["locate"] = {"mode": "network", "folder": str(LOCATOR),
                              "axes": "z" if options["locate"] == "network-z" else "zyx"}
    elif options.get("locate") == "model":
        sections["locate"] = {"mode": "model"}
    return sections


def run_one(args: argparse.Namespace) -> None:
    """Child process: one configuration, one case, through `run_folder` as `flarebox predict` runs
    it (the case is read while the model loads); prints a JSON line with its figures."""
    t0 = time.perf_counter()
    from flarebox.cli import leave_now
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor, run_folder

    sections = config_sections(f"{args.backend}:{args.precision}:{args.options}")
    config = from_dict({"model": {"folder": args.model}, **sections, "export": {"mode": args.export_mode}},
                       Path.cwd())
    network_seconds, tiles, stages = 0.0, 0, {"imports": time.perf_counter() - t0}

    def load() -> Predictor:
        start = time.perf_counter()
        predictor = Predictor.from_config(config)
        cls = type(predictor.backend)
        predict = cls.predict
        locating = False  # the locator's own network counts in its stage; mode "model"'s pass is the network's
        if predictor.locator is not None and predictor.locator.backend is not predictor.backend:
            locate = predictor.locator.locate

            def flagged(*args, **kwargs):
                nonlocal locating
                locating = True
                try:
                    return locate(*args, **kwargs)
                finally:
                    locating = False

            predictor.locator.locate = flagged

        def timed(self, tile: np.ndarray) -> np.ndarray:  # on the class: fitted-tile copies are timed too
            nonlocal network_seconds, tiles
            if locating:
                return predict(self, tile)
            self.compile()  # a tile shape's compilation is not the network's time
            begin = time.perf_counter()
            out = predict(self, tile)
            network_seconds += time.perf_counter() - begin
            tiles += 1
            return out

        cls.predict = timed
        stages["load model"] = time.perf_counter() - start
        return predictor

    notes: dict[str, str] = {}

    def on_case(_case, timings) -> None:
        stages.update(timings.stages)
        notes.update(timings.notes)

    if run_folder(load, Path(args.inputs), Path(args.out), on_case=on_case):
        raise SystemExit("the case failed")
    print(json.dumps({"stages": stages, "network": network_seconds, "tiles": tiles,
                      "locate": notes.get("locate", "")}))
    leave_now(0)  # as `python -m flarebox predict` ends


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a command; returns wall seconds from start to exit, peak RSS in GB and stdout.

    Peak RSS is the peak of the process tree's summed RSS, sampled every 20 ms (nnU-Net's predictor
    forks workers). Not ru_maxrss: Linux carries a parent's high-water mark into its children."""
    import psutil

    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        peak_tree, stop = 0, threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            root = psutil.Process(proc.pid)
            while not stop.wait(0.02):
                try:
                    members = [root, *root.children(recursive=True)]
                    peak_tree = max(peak_tree, sum(m.memory_info().rss for m in members))
                except psutil.Error:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = proc.stdout.read()
        proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
    return wall, peak_tree / 1024**3, out.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[300], help="case sizes (512x512xS)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="cases, each at every size")
    parser.add_argument("--workdir", default=str(ROOT / ".bench"))
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--export-mode", default="labels", choices=("labels", "logits"))
    parser.add_argument("--nnunet", action="store_true", help="also time nnUNetv2 predict from .venv-nnunet")
    parser.add_argument("--seed-script", help="path of the FLARE24 Task 2 authors' inference_flare_task2.py to time")
    parser.add_argument("--no-resampling", action="store_true", help="skip the resampling comparison")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args)
        return
    if args.calibrate:
        calibrate(args)
        return

    workdir = Path(args.workdir)
    model, _ = prepare(workdir, args.slices[0])
    env = dict(os.environ)
    precisions = ["f32", "bf16", "int8"]  # one tile each: what this CPU makes of each precision
    print(cpu_line(), flush=True)
    print(f"model: Task 2 PlainConvUNet (random weights); {os.cpu_count()} CPU threads; export mode "
          f"{args.export_mode}", flush=True)
    print(machine_line(workdir, model, precisions, env) + "\n", flush=True)
    table = []
    for case, slices in ((case, slices) for case in args.cases for slices in args.slices):
        model, inputs = prepare(workdir, slices, case)
        print(f"case: {case} CT 512x512x{slices} at 0.8x0.8x2.5 mm", flush=True)
        rows = []
        for spec in args.configs:
            backend, precision, options = (spec.split(":") + [""])[:3]
            cmd = [sys.executable, "-m", "flarebox_tools.bench.task2", "--run-one", "--backend", backend, "--precision",
                   precision, "--options", options, "--model", str(model), "--inputs", str(inputs),
                   "--out", str(workdir / f"out_{backend}_{precision}"), "--export-mode", args.export_mode]
            wall, rss_gb, out = measure(cmd, env=env)
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((f"{backend} {precision} {options}".strip(), wall, result, rss_gb))
            print_row(*rows[-1])
        others = {}
        if args.nnunet:
            others["nnUNetv2_predict"] = bench_nnunet(workdir, model, inputs)
        if args.seed_script:
            others["seed script"] = bench_seed_script(workdir, model, inputs, Path(args.seed_script))
        name, ours = rows[-1][0], rows[-1][1]
        for other, (wall, _) in others.items():
            print(f"{name} is {wall / ours:.1f}x faster than {other} (whole process, same case, this run)")
        plain = " ".join(DEFAULT.split(":"))  # the default's row label without the locate stage
        without = next((wall for label, wall, _, _ in rows if label == plain), None)
        if without is not None and name != plain:
            print(f"{name} takes {ours / without:.2f}x the time of {plain} (same case, this run)")
        for label, wall, result, rss_gb in rows:
            table.append((case, slices, label, f"{wall:.2f}", f"{result['network']:.2f}", str(result["tiles"]),
                          f"{wall / result['network']:.2f}", f"{rss_gb:.2f}", result.get("locate", "")))
        for other, (wall, rss_gb) in others.items():
            table.append((case, slices, other, f"{wall:.1f}", "", "", "", f"{rss_gb:.2f}", ""))
        print(flush=True)
    print("| case | slices | configuration | whole process s | network s | tiles | whole/network | peak RSS GB "
          "| locate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    if not args.no_resampling:
        bench_resampling(args.slices[0])


def machine_line(workdir: Path, model: Path, precisions: list[str], env: dict) -> str:
    """What this machine does with one full Task 2 tile (40x224x192) per precision, and what it
    costs here to touch memory a process never touched before (a virtual machine can be slow at
    it; that cost lands in every fresh process's stages), so figures can be set against another
    machine's."""
    cmd = [sys.executable, "-m", "flarebox_tools.bench.task2", "--calibrate", "--model", str(model),
           "--options", ",".join(precisions)]
    _, _, out = measure(cmd, env=env)
    figures = json.loads(out.strip().splitlines()[-1])
    tiles = ", ".join(f"{p} {figures[p]:.2f} s" if figures[p] == figures[p] else f"{p} refused"
                      for p in precisions)
    return (f"this machine: one 40x224x192 tile {tiles}; fresh memory {figures['touch_s_per_gb']:.2f} s per GB "
            "on first touch")


def calibrate(args: argparse.Namespace) -> None:
    from flarebox.backends.openvino_runtime import OpenVINOBackend
    from flarebox.models import load_plan

    start = time.perf_counter()
    fresh = np.empty(2**29, dtype=np.uint8)
    fresh[::4096] = 1
    figures = {"touch_s_per_gb": (time.perf_counter() - start) * 2}
    del fresh
    plan = load_plan(Path(args.model), "3d_fullres")
    tile = np.random.default_rng(0).normal(size=(1, 1, *plan.patch_zyx)).astype(np.float32)
    for precision in filter(None, args.options.split(",")):
        backend = OpenVINOBackend(plan, precision=precision)
        try:
            backend.predict(tile)
        except RuntimeError:  # the CPU plugin refuses it (bf16 where oneDNN is held to AVX2)
            figures[precision] = float("nan")
            continue
        start = time.perf_counter()
        for _ in range(3):
            backend.predict(tile)
        figures[precision] = (time.perf_counter() - start) / 3
    print(json.dumps(figures))


def bench_resampling(slices: int) -> None:
    """The two resampling steps around the network, each way we have, on the benchmark's grid."""
    import SimpleITK as sitk
    from scipy import ndimage

    from flarebox.export import _logits_to_labels_trilinear
    from flarebox.resample import resize_linear, resize_nearest
    from flarebox.sliding_window import argmax_classes
    from flarebox_tools.synthetic import ct_like

    image = ct_like((slices, 512, 512)).astype(np.float32)
    low = (slices, 164, 164)

    def sitk_resize() -> None:
        itk = sitk.GetImageFromArray(image)
        itk.SetSpacing((0.8, 0.8, 2.5))
        out_spacing = (0.8 * 512 / 164, 0.8 * 512 / 164, 2.5)
        sitk.Resample(itk, low[::-1], sitk.Transform(), sitk.sitkLinear,
                      tuple(o + 0.5 * (s - 0.8) for o, s in zip((0.0, 0.0, 0.0), out_spacing, strict=True)),
                      out_spacing)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows = {f"image 512x512x{slices} -> 2.5 mm, torch trilinear": lambda: resize_linear(image, low, "torch"),
            f"image 512x512x{slices} -> 2.5 mm, NumPy separable (ours)": lambda: resize_linear(image, low, "numpy"),
            f"image 512x512x{slices} -> 2.5 mm, scipy zoom order 1": lambda: ndimage.zoom(
                image, [o / i for o, i in zip(low, image.shape, strict=True)], order=1, mode="nearest",
                grid_mode=True, prefilter=False),
            f"image 512x512x{slices} -> 2.5 mm, SimpleITK linear": sitk_resize}
    logits = np.random.default_rng(0).normal(size=(14, *low)).astype(np.float32)
    rows["labels back: argmax at 2.5 mm (ours) + nearest"] = lambda: resize_nearest(argmax_classes(logits),
                                                                                    image.shape)
    rows["labels back: 14 logits trilinear (torch, slabs) + argmax"] = (
        lambda: _logits_to_labels_trilinear(logits, image.shape, "torch", 8))
    print("\nresampling around the network (two threads):")
    for name, fn in rows.items():
        print(f"  {name:58s} {timed(fn):6.2f}s", flush=True)


def print_row(name: str, wall: float, result: dict, rss_gb: float) -> None:
    stages = " ".join(f"{k} {v:.2f}" for k, v in result["stages"].items())
    located = f" | {result['locate']}" if result.get("locate") else ""
    print(f"{name:30s} whole process {wall:6.2f}s | {stages} | network {result['network']:.2f}s "
          f"({result['tiles']} tiles) | whole/network {wall / result['network']:.2f} | peak RSS {rss_gb:.2f} GB"
          f"{located}", flush=True)


SEED_PATCH = (  # the script reads self.use_openvino / self.is_openvino, which it never sets
    '        self.network = core.compile_model(ov_model, "CPU", config= config)\n',
    '        self.network = core.compile_model(ov_model, "CPU", config= config)\n'
    '        self.use_openvino = self.is_openvino = True  # flarebox bench: the script never sets these\n',
)


def bench_seed_script(workdir: Path, model: Path, inputs: Path, script: Path) -> tuple[float, float]:
    """The FLARE24 Task 2 authors' own OpenVINO script (nnU-Net repository,
    documentation/competitions/FLARE24/Task_2/inference_flare_task2.py), given by path and never
    shipped: patched minimally (the two attributes above), run in the nnU-Net environment with
    OpenVINO added, on a copy of the model with its fold named 'all' as the script expects. Its IR is
    made by its own `-save_model` run first, untimed; the timed run is the whole process."""
    python = ROOT / ".venv-nnunet" / "bin" / "python"
    if subprocess.run([str(python), "-c", "import openvino"], capture_output=True).returncode != 0:
        pins = [line.strip() for line in (ROOT / "common" / "constraints.txt").read_text().splitlines()
                if line.startswith(("openvino==", "openvino-telemetry=="))]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    text = Path(script).read_text()
    if SEED_PATCH[0] not in text:
        raise SystemExit(f"{script}: not the script this bench knows how to patch (no compile_model line)")
    patched = workdir / "seed_inference_flare_task2.py"
    patched.write_text(text.replace(SEED_PATCH[0], SEED_PATCH[1]))
    seed_model = workdir / "seed_model"
    if not (seed_model / "model.xml").is_file():
        shutil.rmtree(seed_model, ignore_errors=True)
        seed_model.mkdir()
        for name in ("plans.json", "dataset.json"):
            shutil.copy(model / name, seed_model / name)
        shutil.copytree(model / "fold_0", seed_model / "fold_all")
        subprocess.run([str(python), str(patched), "-i", str(inputs), "-o", str(workdir / "seed_out"),
                        "-m", str(seed_model), "-save_model"], check=True, capture_output=True)
    cmd = [str(python), str(patched), "-i", str(inputs), "-o", str(workdir / "seed_out"), "-m", str(seed_model)]
    wall, rss_gb, _ = measure(cmd)
    print(f"{'seed authors script (OpenVINO)':30s} whole process {wall:6.2f}s | peak RSS {rss_gb:.2f} GB", flush=True)
    return wall, rss_gb


def bench_nnunet(workdir: Path, model: Path, inputs: Path) -> tuple[float, float]:
    """nnU-Net v2's own command line on the same model folder and case: CPU, no test-time mirroring,
    its default worker processes; the whole process is timed."""
    command = ROOT / ".venv-nnunet" / "bin" / "nnUNetv2_predict_from_modelfolder"
    out = workdir / "nnunet_out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(command), "-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu",
           "--disable_tta"]
    wall, rss_gb, _ = measure(cmd)
    print(f"{'nnUNetv2_predict (cpu, no TTA)':30s} whole process {wall:6.2f}s | peak RSS {rss_gb:.2f} GB", flush=True)
    return wall, rss_gb


if __name__ == "__main__":
    main()
