"""Command line: train one fold of a model on an nnU-Net raw dataset.

    flarebox-tools train --dataset RAW_DIR --out MODEL_DIR --config train.toml
    torchrun --standalone --nproc_per_node 2 -m flarebox_tools.training --dataset RAW_DIR --out MODEL_DIR ...

`--config` holds `[train]` and, to create MODEL_DIR's plans.json, `[network]` (see
flarebox_tools/training/config.py). Options below override `[train]` keys. One line per epoch (rank 0):
loss, learning rate, steps per second, validation DSC/NSD when validated, seconds.

Interrupted (SIGTERM, SIGINT, a killed process), the same command goes on from checkpoint_latest.pth:
the step it reached, with its optimiser, schedule, training time and the very batches it would have
drawn (see loader.py). `--restart` starts afresh instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flarebox.errors import CaseError, ConfigError

OVERRIDES = (("epochs", int), ("iterations-per-epoch", int), ("batch-size", int), ("learning-rate", float),
             ("optimizer", str), ("time-limit-minutes", float), ("validation-cases", int),
             ("validate-every-epochs", int), ("device", str), ("seed", int), ("data-workers", int),
             ("checkpoint-every-minutes", float), ("init-weights", str))


def parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(prog="flarebox-tools train", description=__doc__.splitlines()[0])
    t.add_argument("--dataset", required=True, help="nnU-Net raw dataset (imagesTr, labelsTr, dataset.json)")
    t.add_argument("--out", required=True, help="model folder (created from [network] if it has no plans.json)")
    t.add_argument("--config", help="TOML file with [train] and optionally [network]")
    t.add_argument("--fold", type=int, default=0)
    t.add_argument("--cache", help="folder for preprocessed cases (default DATASET/preprocessed)")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--continue", dest="resume", action="store_const", const=True,
                       help="insist on resuming from checkpoint_latest.pth (the default resumes when there is one)")
    start.add_argument("--restart", dest="resume", action="store_const", const=False,
                       help="start afresh even when checkpoint_latest.pth exists")
    for name, kind in OVERRIDES:
        t.add_argument(f"--{name}", type=kind, help="overrides [train] " + name.replace("-", "_"))
    return t


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # one voice: rank 0 reports progress, the other ranks only warnings and errors
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    from flarebox_tools.training.config import load_config
    from flarebox_tools.training.trainer import Interrupted, train

    try:
        overrides = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in OVERRIDES}
        config, network = load_config(args.config, **overrides)
        train(args.dataset, args.out, config, network_spec=network, fold=args.fold, cache_dir=args.cache,
              resume=args.resume)
    except (ConfigError, CaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
