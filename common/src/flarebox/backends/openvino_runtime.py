"""OpenVINO CPU runtime: one compiled model per fold, latency-oriented, from IR files in the model folder."""

from __future__ import annotations

import copy
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


def manifest_entry(plan: ModelPlan, key: str) -> str | None:
    """An entry of the model's openvino/manifest.json (`flarebox-tools convert`); None where absent:
    int8_overflow_fix, how the INT8 IR was quantised for CPUs without VNNI (absent: NNCF's
    default); int8_without_vnni, whether it ran on OpenVINO's AVX2 kernels ("ok", or what failed)."""
    manifest = plan.folder / "openvino" / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get(key)
    except (OSError, ValueError):
        return None


def verify_manifest(plan: ModelPlan, paths: list[Path]) -> None:
    """Check IR files against the sha256 recorded by `flarebox-tools convert`, so a stale IR never runs."""
    manifest_path = plan.folder / "openvino" / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path}: missing; run `flarebox-tools convert` on the model folder")
    manifest = json.loads(manifest_path.read_text())["files"]
    for xml in paths:
        for part in (xml, xml.with_suffix(".bin")):
            recorded = manifest.get(part.name)
            if recorded is None or recorded != sha256(part):
                raise ConfigError(f"{part}: sha256 does not match {manifest_path}; convert the model again")


class OpenVINOBackend:
    """A `Backend` (backends/__init__.py) on OpenVINO's CPU plugin; never a GPU one."""

    needs_compile = True  # each tile shape is compiled once, on first use or by compile()
    tensors = None
    gpu = None
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
        self.z_halo = plan.z_halo
        self.precision = precision
        if not folds:
            raise ConfigError(f"{plan.folder}: no fold to run (no fold_<k> folder, no openvino/fold_<k>_*.xml)")
        paths = [ir_path(plan, fold, precision) for fold in folds]
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"{path}: missing; run `flarebox-tools convert` (with calibration images for int8)")
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
        self._core, self._paths, self._config = core, paths, config
        self._nominal_patch = tuple(self.patch_zyx)
        # Compiled on first use: with fitted tiles (`for_patch`) the model's own patch often never runs.
        self._requests: list[ov.InferRequest] | None = None
        self._by_patch: dict[tuple[int, int, int], OpenVINOBackend] = {tuple(self.patch_zyx): self}

    @staticmethod
    def _compile(core: ov.Core, model: Path | ov.Model, config: dict[str, object]) -> ov.CompiledModel:
        source = str(model) if isinstance(model, Path) else model
        try:
            return core.compile_model(source, "CPU", config)
        except RuntimeError:
            # A cache made on another CPU cannot be rewritten on a read-only file system: compile
            # without it rather than fail the case.
            core.set_property({"CACHE_DIR": ""})
            return core.compile_model(source, "CPU", config)

    def for_patch(self, patch_zyx: tuple[int, int, int]) -> OpenVINOBackend:
        """The same model for another tile shape (compiled once per shape, on first use; the
        compiled-model cache keeps it across runs where it is writable)."""
        patch_zyx = tuple(int(p) for p in patch_zyx)
        if patch_zyx not in self._by_patch:
            other = copy.copy(self)  # shares the core, the settings and this table of shapes
            other.patch_zyx, other._requests = patch_zyx, None
            self._by_patch[patch_zyx] = other
        return self._by_patch[patch_zyx]

    def compile(self) -> None:
        """Compile this tile shape now (it happens on the first tile otherwise)."""
        if self._requests is not None:
            return
        requests = []
        for path in self._paths:
            model: Path | ov.Model = path
            config = self._config
            fitted = tuple(self.patch_zyx) != self._nominal_patch
            if fitted or self.z_halo:  # a 2.5D network's IR leaves the tile's shape open (convert.py)
                model = self._core.read_model(str(path))
                model.reshape({0: [1, model.inputs[0].partial_shape[1].get_length(), *self.patch_zyx]})
            if fitted:
                # A fitted shape is the case's own: written to the cache it would cost time (a large
                # blob) in a container discarded after the run; this process keeps it for later cases.
                config = {**config, "CACHE_DIR": ""}
            requests.append(self._compile(self._core, model, config).create_infer_request())
        self._requests = requests

    def predict(self, tile: np.ndarray) -> np.ndarray:
        self.compile()
        # The request's own output buffer, not a copy: a fresh logits array per tile costs the copy
        # and the kernel's zeroing of new pages, a few % of the network's time.
        outs = [request.infer({0: tile}, share_inputs=True, share_outputs=True)[0] for request in self._requests]
        if len(outs) == 1:
            return outs[0]
        return np.mean(outs, axis=0, dtype=np.float32)
