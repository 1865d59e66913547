"""The bundle manifest: typed, authoritative, and the only way the runtime finds a bundle's files.

`manifest.json` lists every file of the bundle with its sha256 and size; loading refuses a bundle whose
schema is unknown or whose files do not match. Hashing gigabytes takes seconds, so a full check is
remembered per file, keyed by (path, size, mtime): a later load re-hashes only what changed on disk.
`omniguard-edge verify BUNDLE` always re-hashes everything (docs/design.md "Seams").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: list  # ints for fixed axes, strings for dynamic axes


@dataclass(frozen=True)
class Tolerance:
    """Agreement with PyTorch demanded of a graph output at export time."""

    max_abs: float  # largest |onnx - torch|, times max(1, peak |torch|) when max_abs_scaled_by_peak
    cosine: float  # minimum cosine similarity of the flattened outputs
    rel_l2: float  # maximum ||onnx - torch|| / ||torch||
    # fp32 rounding grows with the values: a fixed absolute bound passes small outputs and fails large
    # ones that agree to 1e-5 relative. Scaled, the bound is 1e-4 for outputs within [-1, 1].
    max_abs_scaled_by_peak: bool = True


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its file (and external data file), interface and measured fidelity."""

    file: str
    precision: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tolerance: Tolerance | None  # None: not validated against PyTorch (a quantized graph: see the manifest's fidelity)
    data_file: str | None = None  # single external-data file for graphs over 2 GB
    validation: list[dict] = field(default_factory=list)  # per case and output: max_abs, cosine, rel_l2

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        d["tolerance"] = Tolerance(**d["tolerance"]) if d["tolerance"] is not None else None
        return cls(**d)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    role: str  # graph, graph-data, embedding, tokenizer, template, processor, report, ...


_TYPES = {"int": int, "str": str, "bool": bool, "dict": dict, "list": list, "float": (int, float)}


class _Section(Mapping):
    """A typed manifest section, checked when the manifest is read; readable by attribute (`decoder.head_dim`) and,
    for callers written against the plain dict, by key (`decoder["head_dim"]`, `.get`)."""

    def __getitem__(self, key):
        if key in self._names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, value, where: str):
        """`value` (the JSON object) as this section: a missing field or a value of the wrong type is a
        BundleError naming it; keys this runtime does not know are ignored."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise BundleError(f"manifest.json: {where} must be an object, not {type(value).__name__}: re-export the bundle")
        out = {}
        for f in dataclasses.fields(cls):
            optional = f.default is not dataclasses.MISSING
            if f.name not in value:
                if optional:
                    continue
                raise BundleError(f"manifest.json: {where}.{f.name} is missing: re-export the bundle with this "
                                  "omniguard-edge")
            v, kinds = value[f.name], str(f.type).replace(" ", "").split("|")
            ok = (v is None and "None" in kinds) or any(
                isinstance(v, _TYPES[k]) and not (k != "bool" and isinstance(v, bool)) for k in kinds if k in _TYPES)
            if not ok:
                raise BundleError(f"manifest.json: {where}.{f.name} must be {f.type}, not {v!r}: re-export the bundle")
            out[f.name] = v
        return cls(**out)


@dataclass(frozen=True, eq=False)
class DecoderGeometry(_Section):
    """The text decoder: sizes, KV layout, rotary (TMRoPE) parameters."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_parameters: dict
    position_id_per_seconds: int
    seconds_per_chunk: float
    tie_word_embeddings: bool = False
    kv_layout: str = "batch,kv_heads,seq,head_dim"
    rope_inv_freq: list | None = None  # the rotary frequencies as transformers computes them (fast decoder)


@dataclass(frozen=True, eq=False)
class VisionGeometry(_Section):
    """The vision encoder's patching, windows and widths."""

    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    hidden_size: int
    depth: int
    fullatt_block_indexes: list
    out_hidden_size: int
    # heads per chunk of the full-attention blocks' padded frame batch; 0 (exports before the padded batches): the
    # graph attends over all patches with segment masks (export/graphs/vision.py, runtime/memory.py)
    full_head_chunk: int = 0
    num_heads: int | None = None  # None in exports before they were recorded (memory.py then assumes head_dim 80)
    intermediate_size: int | None = None  # None likewise (then 4 x hidden_size)


@dataclass(frozen=True, eq=False)
class AudioGeometry(_Section):
    """The audio encoder's mel bins, chunking and widths."""

    num_mel_bins: int
    n_window: int
    d_model: int
    encoder_layers: int
    output_dim: int
    max_source_positions: int


SECTIONS = {"decoder": DecoderGeometry, "vision": VisionGeometry, "audio": AudioGeometry}


# What a bundle's weights are (manifest `source.weights`): a real checkpoint; a reference checkpoint whose text decoder
# is trained (small-real: its verdicts discriminate, so precision is judged on them); a reference with random weights
# (its verdicts mean nothing, so a recipe's verdict agreement is reported, not enforced).
WEIGHTS = ("checkpoint", "trained-decoder", "random")


def weights_of(source: dict) -> str:
    """One of WEIGHTS for a manifest's `source` (bundles exported before `weights` was recorded: from
    `reference_checkpoint`)."""
    kind = source.get("weights")
    if kind in WEIGHTS:
        return kind
    return "random" if source.get("reference_checkpoint") else "checkpoint"


def files_digest(manifest: "Manifest") -> str:
    """One sha256 over a bundle's listed files and their hashes: what a recipe's manifest records of its fp32 source
    (`recipe.source_bundle.files_sha256`), so the source can be recognised later (accuracy.py's recipe gate)."""
    import hashlib

    return hashlib.sha256("".join(f"{k}:{v.sha256}" for k, v in sorted(manifest.files.items())).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a bundle; written as manifest.json."""

    schema_version: int
    source: dict  # checkpoint name, layout (full|thinker), model_type, config sha256
    exporter: dict  # package versions used to export
    precision: str  # fp32, fp16, int8, int4
    special_ids: dict  # token name -> id, read from the checkpoint
    decoder: DecoderGeometry  # geometry and KV layout (a dict given here is checked and typed)
    vision: VisionGeometry  # patch/merge/window sizes, widths
    audio: AudioGeometry  # mel bins, chunking, widths
    preprocess: dict  # image mean/std/min/max pixels, audio sample rate, n_fft, hop
    graphs: dict[str, GraphSpec]
    files: dict[str, FileEntry]
    embedding: dict  # file, dtype, shape
    calibration: dict | None = None  # the calibration set a recipe used: its sha256, counts per modality
    recipe: dict | None = None  # the precision recipe that made this bundle from an fp32 one (calibration/recipes.py)
    fidelity: dict | None = None  # that recipe's fidelity against the fp32 bundle, and its gate (calibration/quantize.py)

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            object.__setattr__(self, name, kind.parse(getattr(self, name), name))
        if not isinstance(self.special_ids, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in self.special_ids.items()):
            raise BundleError("manifest.json: special_ids must map token names to integer ids: re-export the bundle")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION}): "
                "re-export the bundle with a matching omniguard-edge"
            )
        d = dict(d)
        try:
            d["graphs"] = {k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()}
            d["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json is malformed ({exc}): re-export the bundle") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_path() -> Path:
    root = os.environ.get("OMNIGUARD_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniguard-edge"
    )
    return Path(root) / "verified.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def verify_files(bundle: Path, files: dict[str, FileEntry], full: bool = False) -> int:
    """Check every listed file's size and sha256; returns how many files were actually hashed.

    With `full=False` a file whose (path, size, mtime) matches a remembered successful check is not
    re-hashed. Raises BundleError naming the first file that is missing or differs.
    """
    cache = {} if full else _load_cache()
    hashed = 0
    for name, entry in sorted(files.items()):
        path = bundle / name
        try:
            st = path.stat()
        except OSError:
            raise BundleError(f"{bundle}: {name} is listed in the manifest but missing: re-export the bundle")
        if st.st_size != entry.size:
            raise BundleError(
                f"{bundle}: {name} is {st.st_size} bytes, the manifest says {entry.size}: "
                "the file was altered after export; re-export the bundle"
            )
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if cache.get(key) == entry.sha256:
            continue
        digest = sha256_file(path)
        hashed += 1
        if digest != entry.sha256:
            raise BundleError(
                f"{bundle}: {name} sha256 mismatch (manifest {entry.sha256[:12]}..., file {digest[:12]}...): "
                "the file was altered after export; re-export the bundle"
            )
        cache[key] = digest
    if hashed:
        merged = _load_cache()
        merged.update(cache)
        _save_cache(merged)
    return hashed


def load_manifest(bundle: str | os.PathLike, verify: str = "auto") -> Manifest:
    """Read and check a bundle's manifest.

    verify: "auto" (hash files not already verified at their current size and mtime), "full"
    (re-hash everything) or "none" (trust the files; only for tools that merely inspect).
    """
    if verify not in ("auto", "full", "none"):
        raise ValueError(f"verify must be 'auto', 'full' or 'none', not {verify!r}")
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a bundle: no {MANIFEST_NAME} (export one with `omniguard-edge export`)")
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): re-export the bundle") from exc
    manifest = Manifest.from_dict(raw)
    for gname, spec in manifest.graphs.items():
        for f in (spec.file, spec.data_file):
            if f is not None and f not in manifest.files:
                raise BundleError(f"{path}: graph '{gname}' file {f} has no hash entry: re-export the bundle")
    if verify != "none":
        verify_files(bundle, manifest.files, full=verify == "full")
    return manifest
