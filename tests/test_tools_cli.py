"""flarebox_tools.cli: the `flarebox-tools` command dispatches to each tool and refuses in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = shutil.which("flarebox-tools") or str(ROOT / ".venv" / "bin" / "flarebox-tools")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TOOLS, *args], capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_command():
    from flarebox_tools.cli import COMMANDS

    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"flarebox-tools {command}" in result.stdout


def test_an_unknown_command_is_one_line():
    result = run("segment")
    assert result.returncode == 2 and "unknown command 'segment'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_phantoms_command_writes_a_dataset(tmp_path):
    result = run("phantoms", "--out", str(tmp_path / "ds"), "--n", "1", "--seed", "3", "--spacing-scale", "4",
                 "--label-set", "lesion", "--phases", "portal-venous")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ds" / "imagesTr" / "phantom_0003_0000.nii.gz").is_file()
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}


@pytest.mark.parametrize("command", ["convert", "evaluate", "train"])
def test_each_tool_answers_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and f"flarebox-tools {command}" in result.stdout


def test_convert_of_a_folder_without_a_model_is_one_line(tmp_path):
    result = run("convert", str(tmp_path))
    assert result.returncode == 2 and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_configurations_name_the_bundled_models_or_fail_in_one_line():
    from flarebox_tools.bench.task2 import BUNDLED, config_sections

    sections = config_sections("openvino:auto:body=-500,model=demo,locate=network-z")
    assert sections["model"] == {"folder": str(BUNDLED["demo"])}
    assert sections["locate"]["axes"] == "z" and sections["preprocess"] == {"body_threshold": -500.0}
    with pytest.raises(SystemExit, match="model=big: not one of light, demo"):
        config_sections("openvino:auto:model=big")
