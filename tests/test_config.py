"""config: TOML task files into frozen dataclasses, failing at start with the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from flarebox.config import load_config
from flarebox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_task2_config_loads_with_paths_relative_to_it():
    config = load_config(ROOT / "task2_cpu_organs" / "config.toml")
    assert config.name == "task2_cpu_organs"
    assert config.model.folder == (ROOT / "task2_cpu_organs" / "weights" / "model").resolve()
    assert config.inference.backend == "openvino" and config.inference.mirroring is False
    assert config.inference.step_size == 0.75 and config.inference.fit_patch
    assert config.preprocess.body_threshold == -500.0
    assert config.inference.cache_dir == (ROOT / "task2_cpu_organs" / "ov_cache").resolve()


def test_overrides_from_the_command_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[inference]\nprecision = "int8"\n')
    config = load_config(path, **{"inference.precision": "bf16", "inference.step_size": 1, "model.folds": [0, 1]})
    assert config.inference.precision == "bf16"
    assert config.inference.step_size == 1.0 and isinstance(config.inference.step_size, float)
    assert config.model.folds == (0, 1)
    with pytest.raises(AttributeError):
        config.inference.precision = "f32"  # frozen


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[inference]\nprecison = "f32"\n', "[inference] precison: unknown key"),
        ("[infer]\nx = 1\n", "[infer]: unknown section"),
        ('[inference]\nbackend = "tensorrt"\n', "[inference] backend"),
        ('[inference]\nbackend = "torch"\nprecision = "int8"\n', "[inference] precision"),
        ("[inference]\nstep_size = 0\n", "[inference] step_size"),
        ('[inference]\nmirroring = "yes"\n', "expected true or false"),
        ('[export]\nmode = "cubic"\n', "[export] mode"),
        ('[preprocess]\nresampler = "scipy"\n', "[preprocess] resampler"),  # scipy's engine is gone
        ("[model]\nfolds = []\n", "[model] folds"),
        ("[model\n", "config.toml"),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
