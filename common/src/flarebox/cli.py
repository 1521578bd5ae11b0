"""Command line: `flarebox predict -i IN -o OUT -c task/config.toml` (and `flarebox warmup`).

The Python API mirrors it: `run_folder(Predictor.from_config(load_config(...)), IN, OUT)`. The
host-side tools (conversion, evaluation, training, phantoms) are `flarebox-tools`, not in images.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from flarebox.errors import ConfigError


def _predict(args: argparse.Namespace) -> int:
    from flarebox.config import from_dict, load_config
    from flarebox.memory import GB, Budget
    from flarebox.pipeline import Predictor, Stopped, check_folders, run_folder, stop_on_signals

    overrides = {
        "model.folder": args.model,
        "model.folds": args.folds,
        "inference.backend": args.backend,
        "inference.device": args.device,
        "inference.precision": args.precision,
        "inference.step_size": args.step_size,
        "inference.mirroring": args.mirroring,
        "inference.threads": args.threads,
        "export.mode": args.export_mode,
    }
    if args.config:
        config = load_config(args.config, **overrides)
    else:
        raw: dict = {}
        for dotted, value in overrides.items():
            if value is not None:
                section, key = dotted.split(".")
                raw.setdefault(section, {})[key] = str(Path(value).resolve()) if key == "folder" else value
        config = from_dict(raw, Path.cwd())
    log = logging.getLogger("flarebox")

    check_folders(Path(args.input), Path(args.output))  # before the model loads: one line, no traceback
    budget = Budget.from_config(config)

    def load() -> Predictor:  # runs while the first case is read
        start = time.perf_counter()
        predictor = Predictor.from_config(config)
        inf = config.inference
        locate = config.locate.mode if config.locate.mode != "network" else f"network {config.locate.folder}"
        log.info("%s: model %s folds %s, %s %s on %s, step %.2f, locate %s, export %s, memory %.1f GB (%s), "
                 "ready in %.2fs", config.name, config.model.folder, list(config.model.folds), inf.backend,
                 predictor.backend.precision, predictor.device, inf.step_size, locate, config.export.mode,
                 budget.limit / GB, budget.source, time.perf_counter() - start)
        return predictor

    try:
        with stop_on_signals():
            failures = run_folder(load, Path(args.input), Path(args.output), skip_existing=args.resume,
                                  budget=budget)
    except Stopped as stopped:
        return 128 + stopped.signum
    return 1 if failures else 0


def _warmup(args: argparse.Namespace) -> int:
    """Build the predictor once (compiling OpenVINO models into the configured cache) and run one tile."""
    from flarebox.config import load_config
    from flarebox.pipeline import Predictor

    start = time.perf_counter()
    Predictor.from_config(load_config(args.config)).warmup()
    logging.getLogger("flarebox").info("warm-up done in %.2fs", time.perf_counter() - start)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flarebox", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment every <case>_0000.nii.gz of a folder")
    p.add_argument("-i", "--input", required=True, help="folder of <case>_0000.nii.gz files")
    p.add_argument("-o", "--output", required=True, help="folder for <case>.nii.gz labels")
    p.add_argument("-c", "--config", help="task config.toml (defaults for everything below)")
    p.add_argument("--model", help="model folder (nnU-Net trained-model layout)")
    p.add_argument("--folds", type=int, nargs="+", help="folds to ensemble")
    p.add_argument("--backend", choices=("openvino", "torch"))
    p.add_argument("--device", choices=("cpu", "cuda", "auto"))
    p.add_argument("--precision", choices=("auto", "f32", "bf16", "int8", "fp16"))
    p.add_argument("--step-size", type=float, help="tile step as a fraction of the patch")
    p.add_argument("--mirroring", action="store_true", default=None, help="test-time mirroring (8x slower)")
    p.add_argument("--threads", type=int, help="inference threads (0 = all)")
    p.add_argument("--export-mode", choices=("labels", "logits"), help="how to return to the input grid")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="leave out cases whose output exists (a rerun after an interruption)")
    p.set_defaults(run=_predict)

    w = sub.add_parser("warmup", help="compile the configured model (fills the OpenVINO cache) and run one tile")
    w.add_argument("-c", "--config", required=True)
    w.set_defaults(run=_warmup)

    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"flarebox: {exc}", file=sys.stderr)
        return 2


def leave_now(code: int) -> NoReturn:
    """End a `predict` process without the interpreter's teardown (OpenVINO's plugin and threads
    unloaded, every array freed one by one), which is time the organisers count, after every output
    has been written, closed and renamed (run_folder joins its writer before it returns)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
