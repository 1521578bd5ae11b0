"""OpenVINO CPU runtime: one compiled model per fold, latency-oriented, from IR files in the model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import openvino as ov

from flarebox.errors import ConfigError
from flarebox.models import ModelPlan, sha256


def ir_path(plan: ModelPlan, fold: int, precision: str) -> Path:
    """IR file of a fold: bf16 runs the f32 IR with bf16 inference precision; int8 has its own IR."""
    kind = "int8" if precision == "int8" else "f32"
    return plan.folder / "openvino" / f"fold_{fold}_{kind}.xml"


def verify_manifest(plan: ModelPlan, paths: list[Path]) -> None:
    """Check IR files against the sha256 recorded by `flarebox convert`, so a stale IR never runs."""
    manifest_path = plan.folder / "openvino" / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path}: missing; run `flarebox convert` on the model folder")
    manifest = json.loads(manifest_path.read_text())["files"]
    for xml in paths:
        for part in (xml, xml.with_suffix(".bin")):
            recorded = manifest.get(part.name)
            if recorded is None or recorded != sha256(part):
                raise ConfigError(f"{part}: sha256 does not match {manifest_path}; convert the model again")


class OpenVINOBackend:
    def __init__(
        self,
        plan: ModelPlan,
        *,
        precision: str = "f32",
        folds: tuple[int, ...] = (0,),
        threads: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        self.patch_zyx = plan.patch_zyx
        self.num_classes = plan.num_classes
        paths = [ir_path(plan, fold, precision) for fold in folds]
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"{path}: missing; run `flarebox convert` (with --int8 for int8)")
        verify_manifest(plan, paths)
        core = ov.Core()
        if cache_dir is not None and (cache_dir.is_dir() or os.access(cache_dir.parent, os.W_OK)):
            # The image compiles into this cache at build time; at run time it is only read.
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config: dict[str, object] = {
            "PERFORMANCE_HINT": "LATENCY",
            # An INT8 IR compiles with f32 as the precision for its non-quantised parts: with bf16
            # the CPU plugin would refuse it on this CPU (AVX-512 BF16, no AMX).
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self._requests = [self._compile(core, p, config).create_infer_request() for p in paths]

    @staticmethod
    def _compile(core: ov.Core, path: Path, config: dict[str, object]) -> ov.CompiledModel:
        try:
            return core.compile_model(str(path), "CPU", config)
        except RuntimeError:
            # A cache made on another CPU cannot be rewritten on a read-only file system: compile
            # without it rather than fail the case.
            core.set_property({"CACHE_DIR": ""})
            return core.compile_model(str(path), "CPU", config)

    def predict(self, tile: np.ndarray) -> np.ndarray:
        # infer() hands back a fresh array per call, so one fold needs no further copy.
        outs = [request.infer({0: tile})[0] for request in self._requests]
        if len(outs) == 1:
            return outs[0]
        return np.mean(outs, axis=0, dtype=np.float32)
