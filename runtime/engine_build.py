"""build-engines: every GPU graph's TensorRT engine built ahead of time on the target, through onnxruntime's
TensorRT provider, and (experimental) as a native TensorRT plan. The top of the GPU seam."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .cuda import probe_gpu, tensorrt_version
from .devices import DEVICE_COSTS
from .engines import (ENGINE_FILE, Profile, check_engine, default_cache, engine_files, engine_key, engine_records,
                      graph_precision, graph_sha256, profiles)
from .errors import GpuError, InputError
from .providers import check_provider, provider_options


def build_engines(bundle, out=None, limits: dict | None = None, native: bool = False, rebuild: bool = False,
                  device_id: int = 0, dry_run: bool = False, progress: bool = True) -> list[dict]:
    """Build every GPU graph's TensorRT engine for this machine, ahead of time: through onnxruntime's TensorRT
    provider (its engine and timing caches, in the key's folder under `out`, default `default_cache(bundle)`), and
    with `native` also as a TensorRT plan through TensorRT's Python API (experimental). One record per graph.

    Refuses (EngineError) when the cache already holds the graph's engines for another key, unless `rebuild`, which
    removes them first. `dry_run`: only the profiles and options, checking nothing of the machine (no GPU needed)."""
    from tqdm import tqdm

    from .manifest import load_manifest

    bundle = Path(bundle)
    m = load_manifest(bundle, verify="none" if dry_run else "full")
    profs = profiles(m, limits)
    cache = Path(out) if out is not None else default_cache(bundle)
    if cache.resolve() == bundle.resolve() or bundle.resolve() in cache.resolve().parents:
        raise InputError(f"--out {cache}: engines go beside the bundle, not inside it (its manifest lists its files)")
    if dry_run:
        return [{"graph": g, "precision": graph_precision(m.graphs[g]), "cache": str(cache),
                 "onnx_sha256": graph_sha256(m, g), "profile": p.option_strings(),
                 "providers": provider_options("tensorrt", g, graph_precision(m.graphs[g]), p, cache / "<key>",
                                               device_id)} for g, p in profs.items()]
    check_provider("tensorrt")
    gpu = probe_gpu(device_id)
    trt_version = tensorrt_version()
    import onnxruntime as ort

    keys = {g: engine_key(m, g, p, gpu.compute_capability, trt_version, ort.__version__) for g, p in profs.items()}
    here = str(bundle.resolve())
    todo = {}
    for graph, key in keys.items():  # every graph is checked before anything is built or removed
        if (cache / key.folder / ENGINE_FILE).is_file() and not rebuild:
            check_engine(cache, key)  # raises when its files are not the ones built
            continue
        found = engine_records(cache, graph)
        if found and not rebuild:
            check_engine(cache, key)  # raises: the other keys' engines, and what differs
        # --rebuild replaces this bundle's engines (by its path), never another bundle's in a shared folder; and
        # whatever a stopped build left in this key's folder
        todo[graph] = {f for f, rec in found if rec is None or rec.get("bundle") == here} | {cache / key.folder}
    records = [{**keys[g].to_json(), "status": "up to date"} for g in keys if g not in todo]
    for graph in tqdm(list(todo), desc="engines", unit="graph", disable=not progress):
        key, prof, spec = keys[graph], profs[graph], m.graphs[graph]
        for old in todo[graph]:
            shutil.rmtree(old, ignore_errors=True)
        folder = cache / key.folder
        folder.mkdir(parents=True)
        sess = ort.InferenceSession(str(bundle / spec.file), ort.SessionOptions(),
                                    providers=provider_options("tensorrt", graph, key.precision, prof, folder,
                                                               device_id))
        if sess.get_providers()[0] != "TensorrtExecutionProvider":
            raise GpuError(f"{spec.file}: onnxruntime did not run it on TensorRT ({sess.get_providers()})")
        del sess  # with complete explicit profiles the engines are built as the session is created
        if not any(p.suffix == ".engine" for p in folder.iterdir()):
            raise GpuError(f"{spec.file}: onnxruntime's TensorRT provider wrote no engine into {folder}")
        if native:
            build_native_plan(bundle / spec.file, prof, folder / f"{graph}.plan", folder / "native.timing")
        record = {**key.to_json(), "bundle": here, "gpu": gpu.name,
                  "files": {n: size for n, (size, _) in engine_files(folder).items()}, "status": "built"}
        tmp = folder / (ENGINE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, folder / ENGINE_FILE)  # last: a build that stopped part-way has no record, so is not used
        records.append(record)
    return records


def build_native_plan(onnx_path: Path, profile: Profile, dest: Path, timing: Path) -> None:
    """EXPERIMENTAL, never run here (no GPU): a TensorRT plan of the graph at `onnx_path` through TensorRT's Python
    API, as a strongly typed network (the graph's own types decide every layer's precision; explicit Q/DQ needs no
    INT8 flag and no calibrator), with `profile` as its one optimization profile and a timing cache at `timing`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external data is read beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GpuError(f"{onnx_path.name}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, DEVICE_COSTS["trt_workspace"][0])
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GpuError(f"{onnx_path.name}: TensorRT built no plan (its log above says why)")
    dest.write_bytes(bytes(plan))
    timing.write_bytes(bytes(config.get_timing_cache().serialize()))
