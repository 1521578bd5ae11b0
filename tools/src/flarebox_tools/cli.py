"""`flarebox-tools COMMAND ...`: the host-side tools beside the runtime (never installed in an image).

    flarebox-tools evaluate -t TASK -i IMAGES -g LABELS -r REPORT   the organisers' evaluation, scored
    flarebox-tools convert MODEL [--calibration-dir IMAGES]         OpenVINO IR, INT8 with calibration
    flarebox-tools train --dataset RAW --out MODEL --config train.toml  train a model folder
    flarebox-tools transfer --ct CT_RAW --mri MRI_DIR --work DIR    Task 3: MRI models from labelled CT
    flarebox-tools demo --task task2 --out MODEL --work DIR         the bundled demo weights
    flarebox-tools transfer-demo --out MODEL --work DIR             Task 3's CT-to-MRI demo weights
    flarebox-tools phantoms --out DIR --n 20                        synthetic CT/MRI phantoms
    flarebox-tools realism --real IMAGE LABELS --phantoms DIR       phantoms against a real CT, per organ

`flarebox-tools COMMAND --help` gives each command's options. Every command is also a module
(`python -m flarebox_tools.evaluation`, ...); the benchmarks are `python -m flarebox_tools.bench.*`
behind `make bench*`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flarebox.errors import ConfigError


def _evaluate(argv: list[str]) -> int:
    from flarebox_tools.evaluation.__main__ import main

    return main(argv)


def _convert(argv: list[str]) -> int:
    from flarebox_tools.convert import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from flarebox_tools.training.__main__ import main

    return main(argv)


def _transfer(argv: list[str]) -> int:
    from flarebox_tools.training.transfer import main

    return main(argv)


def _demo(argv: list[str]) -> int:
    from flarebox_tools.training.demo import main

    return main(argv)


def _transfer_demo(argv: list[str]) -> int:
    from flarebox_tools.training.transfer_demo import main

    return main(argv)


def _phantoms(argv: list[str]) -> int:
    from flarebox_tools.phantoms import main

    return main(argv)


def _realism(argv: list[str]) -> int:
    from flarebox_tools.training.realism import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "evaluate": _evaluate, "convert": _convert, "train": _train, "transfer": _transfer, "demo": _demo,
    "transfer-demo": _transfer_demo, "phantoms": _phantoms, "realism": _realism,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"flarebox-tools: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except ConfigError as exc:
        print(f"flarebox-tools {argv[0]}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
