"""cli: `flarebox predict` as a process: exit status, progress lines, one-line refusals before
anything loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flarebox_tools.synthetic import ct_like, write_image
from tests.conftest import make_bad_folder


def test_cli_exit_status_and_progress_lines(tiny_model_dir, tmp_path):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    make_bad_folder(in_dir)
    result = subprocess.run(
        [sys.executable, "-m", "flarebox", "predict", "-i", str(in_dir), "-o", str(out_dir),
         "--model", str(tiny_model_dir), "--precision", "int8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert progress == [line for line in lines if line.startswith("[4/7] good: read ")]
    assert len(progress) == 1
    for stage in ("read", "preprocess", "infer", "export+write", "total"):  # one model's labels: streamed
        assert f"{stage} " in progress[0]
    assert "1 case(s) written, 7 failed" in lines[-1]
    assert os.listdir(out_dir) == ["good.nii.gz"]


def test_cli_bad_config_fails_at_start(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[inference]\nprecision = "int4"\n')
    result = subprocess.run([sys.executable, "-m", "flarebox", "predict", "-i", str(tmp_path), "-o",
                             str(tmp_path / "o"), "-c", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "[inference] precision" in result.stderr and "\n" not in result.stderr.strip()


@pytest.mark.parametrize(("make", "expected"), [
    (lambda t: t / "nowhere", "no such input folder"),
    (lambda t: (t / "a_file").write_text("x") and t / "a_file", "not a folder"),
])
def test_cli_unusable_input_folder_is_one_line_before_anything_loads(tmp_path, make, expected):
    result = subprocess.run([sys.executable, "-m", "flarebox", "predict", "-i", str(make(tmp_path)), "-o",
                             str(tmp_path / "out"), "--model", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("make", "expected"), [
    (lambda t: (t / "taken").write_text("x") and t / "taken", "the output path is a file"),
    (lambda t: (t / "file").write_text("x") and t / "file" / "out", "cannot write the output folder"),
    (lambda t: Path("/proc/flarebox-out"), "cannot write the output folder"),  # a read-only file system
])
def test_cli_unusable_output_folder_is_one_line_before_any_case(tiny_model_dir, tmp_path, make, expected):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    write_image(in_dir / "x_0000.nii.gz", ct_like((12, 40, 36)), spacing_xyz=(2, 2, 3))
    result = subprocess.run([sys.executable, "-m", "flarebox", "predict", "-i", str(in_dir), "-o",
                             str(make(tmp_path)), "--model", str(tiny_model_dir)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "[1/1]" not in result.stdout
