"""A locator for a user's own organ dataset: the network of the locate stage (flarebox.locate),
trained on the same labelled data as the organ model, exported to OpenVINO f32, ready for
`[locate] mode = "network"`.

    flarebox-tools locator --dataset RAW --out weights/locator [--epochs 40] [--work DIR]

RAW is an nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) of CT with the organ labels the
organ model segments. The locator is the demo's (five stages of 8..32 features, 5 mm, 48x64x64; see
flarebox_tools.training.demo, task "locator") with its training settings. Interrupted, the same
command goes on from its last checkpoint (in --work, by default OUT/../.locator-work).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flarebox_tools.training.config import TrainConfig, replace
from flarebox_tools.training.demo import DEMO_TRAINING, TASKS, install_model
from flarebox_tools.training.trainer import exit_status, train

log = logging.getLogger("flarebox_tools.training")


def train_locator(dataset: Path, out: Path, *, work: Path, epochs: int | None = None, seed: int = 0) -> Path:
    """Train, install into `out` (plans, dataset, weights without optimiser state) and convert to
    OpenVINO f32; returns `out`."""
    from flarebox_tools.convert import convert_model

    task = TASKS["locator"]
    changes = {**DEMO_TRAINING, **task.training, "seed": seed}
    if epochs is not None:
        changes["epochs"] = epochs
    final = train(dataset, work / "model", replace(TrainConfig(), **changes), network_spec=task.network,
                  cache_dir=work / "preprocessed")
    install_model(final.parents[1], out)
    convert_model(out)
    log.info("locator ready in %s: set [locate] mode = \"network\", folder = \"%s\"", out, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools locator", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="nnU-Net raw dataset of CT with organ labels")
    parser.add_argument("--out", required=True, help="the locator's model folder to write")
    parser.add_argument("--epochs", type=int, help=f"epochs of {TASKS['locator'].training['iterations_per_epoch']} "
                                                    f"steps (default {TASKS['locator'].training['epochs']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="cache and checkpoints (default: OUT/../.locator-work)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent / ".locator-work"
    return exit_status(lambda: train_locator(Path(args.dataset), out, work=work, epochs=args.epochs, seed=args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
