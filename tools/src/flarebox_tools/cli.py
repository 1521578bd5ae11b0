"""`flarebox-tools COMMAND ...`: the host-side tools beside the runtime (never installed in an image).

    flarebox-tools evaluate -t TASK -i IMAGES -g LABELS -r REPORT   the organisers' evaluation, scored
    flarebox-tools convert MODEL [--calibration-dir IMAGES]         OpenVINO IR, INT8 with calibration
    flarebox-tools train --dataset RAW --out MODEL --config train.toml  train a model folder
    flarebox-tools locator --dataset RAW --out LOCATOR              the locate stage's network for a dataset
    flarebox-tools transfer --ct CT_RAW --mri MRI_DIR --work DIR    Task 3: MRI models from labelled CT
    flarebox-tools demo --task task2 --out MODEL --work DIR         the bundled demo weights
    flarebox-tools transfer-demo --out MODEL --work DIR             Task 3's CT-to-MRI demo weights
    flarebox-tools cps-demo --task task2-light --work DIR           CPS against labels only, few labels
    flarebox-tools phantoms --out DIR --n 20                        synthetic CT/MRI phantoms
    flarebox-tools realism --real IMAGE LABELS --phantoms DIR       phantoms against a real CT, per organ

`flarebox-tools COMMAND --help` gives each command's options. Every command is also a module
(`python -m flarebox_tools.evaluation`, ...); the benchmarks are `python -m flarebox_tools.bench.*`
behind `make bench*`.
"""

from __future__ import annotations

import importlib
import sys

from flarebox.errors import ConfigError

# command -> the module whose main(argv) runs it, imported only when that command runs (the
# trainer's torch need not load for `evaluate`, nor anything for --help)
COMMANDS = {
    "evaluate": "flarebox_tools.evaluation.__main__",
    "convert": "flarebox_tools.convert",
    "train": "flarebox_tools.training.__main__",
    "locator": "flarebox_tools.training.locator",
    "transfer": "flarebox_tools.training.transfer",
    "demo": "flarebox_tools.training.demo",
    "transfer-demo": "flarebox_tools.training.transfer_demo",
    "cps-demo": "flarebox_tools.training.cps_demo",
    "phantoms": "flarebox_tools.phantoms",
    "realism": "flarebox_tools.training.realism",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    module = COMMANDS.get(argv[0])
    if module is None:
        print(f"flarebox-tools: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(module).main(argv[1:])
    except ConfigError as exc:
        print(f"flarebox-tools {argv[0]}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
