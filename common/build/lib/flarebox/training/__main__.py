"""python -m flarebox.training train --dataset RAW --model MODEL_DIR [--config train.toml] [--epochs N ...]"""

from __future__ import annotations

import argparse
import logging
import sys

from flarebox.training.config import load_train_config
from flarebox.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flarebox.training")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one fold of a model folder on an nnU-Net raw dataset")
    t.add_argument("--dataset", required=True)
    t.add_argument("--model", required=True, help="model folder with plans.json and dataset.json")
    t.add_argument("--config", help="TOML file with a [train] table")
    t.add_argument("--fold", type=int, default=0)
    for name, kind in (("epochs", int), ("iterations-per-epoch", int), ("batch-size", int), ("learning-rate", float),
                       ("time-limit-minutes", float), ("device", str), ("optimizer", str), ("seed", int)):
        t.add_argument(f"--{name}", type=kind)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    overrides = {k: getattr(args, k) for k in ("epochs", "iterations_per_epoch", "batch_size", "learning_rate",
                                                "time_limit_minutes", "device", "optimizer", "seed")}
    train(args.dataset, args.model, load_train_config(args.config, **overrides), fold=args.fold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
