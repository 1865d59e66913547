"""Open a bundle by its manifest: verified files, onnxruntime sessions, the memory-mapped embedding
table, the tokenizer and the chat template. No file name is guessed: the manifest names them all."""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checked import is_int
from .backend import open_session
from .errors import BundleError
from .manifest import Manifest, load_manifest


@dataclass(frozen=True)
class SessionOptions:
    """How the graphs run."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime execution providers, in preference order
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    graphs: tuple[str, ...] = ("vision", "audio", "decoder")  # which graphs to open (skip unused encoders)
    # onnxruntime's CPU memory arena keeps every block it ever grew to (after one 6k-token prompt on `tiny`, RSS
    # stayed at 1.7 GB) and grows in powers of two, past what the memory plan counts: under a 6 GiB address-space
    # cap a downscaled 3584x3584 image failed to allocate with it on. Off (the default), freed buffers go back to
    # the system. The cost, measured: none on `small` (text 4.8-5.3 s, 448x448 image 14.6-15.8 s total, either
    # way, 2 A/B rounds); on `tiny` the image path ran 1.4-3x slower (its compute is so small that page faults
    # show). Measured later: on `small` a 1280x720 image's vision encoder took 173.7 s with it off and 79.1 s with it
    # on (39.7 vs 3.0 million page faults): the vision graph now uses its own exact-size arena by default
    # (exact_arena_graphs below). With the arena on, a request whose planned working memory exceeds `arena_shrink_above` bytes runs
    # with arena shrinkage, which hands the free blocks back at the end of its runs (docs/performance.md "Memory").
    cpu_mem_arena: bool = False
    arena_shrink_above: int | None = 256 * 2**20  # None: never shrink
    # Graphs whose intra-op threads keep spinning (busy-waiting) after a run, for the next one. The decoder runs
    # step after step, so its threads stay hot. An encoder runs once per request and another graph follows, so
    # its threads stop spinning when its run returns (onnxruntime's session.force_spinning_stop; they still
    # spin between the operators of a run). docs/performance.md "Threads" has the measurements.
    spin_after_run: tuple[str, ...] = ("decoder",)
    # Graphs (when cpu_mem_arena is off) whose buffers come from a CPU arena that allocates exactly what is asked
    # (onnxruntime's environment allocator, kSameAsRequested, shared by those sessions) and hands its free memory
    # back after every run. The vision encoder allocates and frees a patches x patches score buffer in every block
    # (about 2.6 GB at 6,400 patches); from the system each one is fresh pages. Measured on `small`, one 1280x720
    # image: vision 173.7 s with no arena (39.7 million page faults), 79.1 s with the session arena, 64.7 s with
    # this one (docs/performance.md "Memory").
    exact_arena_graphs: tuple[str, ...] = ("vision",)
    # Which graph runs the decoder role: "auto" takes the bundle's fast graph (decoder_gqa: onnxruntime's
    # GroupQueryAttention with in-place KV buffers, docs/time-to-verdict.md "Time to verdict") when the bundle has one and the first
    # provider is onnxruntime's CPU one, else the standard-ops `decoder`; or name one of the two.
    decoder_graph: str = "auto"
    # GPU providers (runtime/providers.py): the limits TensorRT's optimization profiles are built for (build-engines'
    # names and defaults: max_prompt_tokens, max_image_tokens, max_audio_seconds, new_tokens); the engine cache
    # folder (None: beside the bundle, B.engines); the CUDA device
    limits: dict | None = field(default=None, hash=False)
    engine_cache: str | os.PathLike | None = None
    device_id: int = 0
    # The standard decoder's KV cache (and the cached policy prefix) kept on the session's device between runs,
    # bound as the next run's past (runtime/decode.py): None, on under a GPU provider; True/False to choose
    kv_on_device: bool | None = None

    def __post_init__(self):
        if not self.providers:
            raise ValueError("SessionOptions.providers must name at least one execution provider")
        from .plan import check_limits

        check_limits(self.limits)
        if self.kv_on_device not in (None, True, False):
            raise ValueError(f"SessionOptions.kv_on_device must be None, True or False, not {self.kv_on_device!r}")
        if not is_int(self.device_id) or self.device_id < 0:
            raise ValueError(f"SessionOptions.device_id must be an int >= 0, not {self.device_id!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("SessionOptions thread counts must be >= 0")
        if self.arena_shrink_above is not None and (isinstance(self.arena_shrink_above, bool)
                                                    or not isinstance(self.arena_shrink_above, int)
                                                    or self.arena_shrink_above < 0):
            raise ValueError("SessionOptions.arena_shrink_above must be a number of bytes >= 0 or None")
        if self.decoder_graph not in ("auto", "decoder", "decoder_gqa"):
            raise ValueError(f"SessionOptions.decoder_graph must be 'auto', 'decoder' or 'decoder_gqa', not "
                             f"{self.decoder_graph!r}")
        for name in ("spin_after_run", "exact_arena_graphs"):
            value = getattr(self, name)
            if (isinstance(value, str) or not all(isinstance(g, str) for g in value)
                    or not set(value) <= {"vision", "audio", "decoder"}):
                raise ValueError(f"SessionOptions.{name} must be a tuple of graph names among 'vision', 'audio', "
                                 f"'decoder', e.g. ('decoder',), not {value!r}")


_LAZY_LOCK = threading.Lock()


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    sessions: dict = field(default_factory=dict)  # role -> backend.GraphSession (vision, audio, decoder, decoder_head)
    embedding: np.ndarray | None = None  # [vocab, hidden], memory-mapped
    tokenizer: object = None  # tokenizers.Tokenizer
    chat_template: str = ""
    providers: dict = field(default_factory=dict)  # graph name -> providers actually in use
    decoder_graph: str = "decoder"  # the manifest graph behind sessions["decoder"]: decoder or decoder_gqa
    head_rows: np.ndarray | None = None  # decoder_gqa: the output layer [vocab, hidden], memory-mapped (lm_head.npy)
    # Sessions opened on first use (`session(role)`): the fast decoder's whole output layer is needed only where
    # decoding is free (the critique, `constrain_verdict=False`); a constrained answer never opens it
    lazy_sessions: dict = field(default_factory=dict)

    def session(self, role: str):
        """The session of `role`, opening a lazy one on first use (thread-safe)."""
        if role not in self.sessions and role in self.lazy_sessions:
            with _LAZY_LOCK:
                if role not in self.sessions:
                    self.sessions[role] = self.lazy_sessions[role]()
                    self.providers[role] = self.sessions[role].providers
        return self.sessions[role]

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: the manifest lists no {name}")
        return self.path / name


def _decoder_graph(manifest: Manifest, options: SessionOptions, path: Path) -> str:
    if options.decoder_graph == "decoder":
        return "decoder"
    cpu_first = options.providers[0] == "CPUExecutionProvider"
    fast = {"decoder_gqa", "decoder_gqa_head"} <= set(manifest.graphs)
    if options.decoder_graph == "decoder_gqa":
        if not fast:
            raise BundleError(f"{path}: SessionOptions(decoder_graph='decoder_gqa') but the bundle has no fast decoder "
                              "(export it again with this omniguard-edge, or use decoder_graph='decoder')")
        return "decoder_gqa"
    return "decoder_gqa" if fast and cpu_first else "decoder"


def open_bundle(path: str | os.PathLike, options: SessionOptions | None = None, verify: str = "auto") -> Bundle:
    """Load and check a bundle (BundleError on any problem), then open its sessions."""
    from tokenizers import Tokenizer

    options = options or SessionOptions()
    path = Path(path)
    manifest = load_manifest(path, verify=verify)
    gate = (manifest.fidelity or {}).get("gate", {})
    if gate.get("passed") is False:  # written with `quantize --allow-failing`
        warnings.warn(f"{path}: this {manifest.precision} bundle FAILED its fidelity gate against fp32 "
                      f"({'; '.join(gate.get('failures', []))}); its verdicts may differ from the fp32 bundle's",
                      RuntimeWarning, stacklevel=2)
    bundle = Bundle(path=path, manifest=manifest)
    from . import engines, providers

    cache = Path(options.engine_cache) if options.engine_cache is not None else engines.default_cache(path)
    setup = providers.session_providers(manifest, cache, options)

    def opened(graph: str, role: str, spin=None):
        """A session of `graph` under the GPU setup: its providers, its engine folder unchanged by the opening
        (never a silent rebuild), runs checked against its profile."""
        folder = setup.folders.get(graph)
        if folder and setup.native:  # experimental: the plan through TensorRT's own runtime
            from .trt_native import TrtSession

            return engines.Profiled(TrtSession(folder / f"{graph}.plan", role, options.device_id), setup.profiles[graph])
        before = engines.engine_files(folder) if folder else None
        session = open_session(path / manifest.graphs[graph].file, options, role, spin=spin,
                               providers=setup.providers.get(graph))
        if folder:
            engines.check_unchanged(folder, before, graph)
        return engines.Profiled(session, setup.profiles[graph]) if graph in setup.profiles else session

    for name in options.graphs:
        graph = name
        if name == "decoder":
            graph = bundle.decoder_graph = _decoder_graph(manifest, options, path)
        if graph not in manifest.graphs:
            raise BundleError(f"{path}: the bundle has no {graph} graph (it has {sorted(manifest.graphs)})")
        # The fast decoder's body and output layer alternate within every step: threads of one left spinning slow the
        # other on few cores (measured on `small`, 2 threads: body 80.8 + head 38.8 ms spinning, 58.2 + 19.7 not)
        bundle.sessions[name] = opened(graph, name, spin=False if graph == "decoder_gqa" else None)
        bundle.providers[name] = bundle.sessions[name].providers
        if graph == "decoder_gqa":  # its output layer: a graph for every row (opened on first use), the rows for a few
            head = manifest.graphs["decoder_gqa_head"]
            bundle.head_rows = np.load(bundle.file(head.data_file), mmap_mode="r")
            bundle.lazy_sessions["decoder_head"] = lambda: opened("decoder_gqa_head", "decoder", spin=False)
    emb = manifest.embedding
    bundle.embedding = np.load(bundle.file(emb["file"]), mmap_mode="r")
    if list(bundle.embedding.shape) != list(emb["shape"]):
        raise BundleError(f"{path}: {emb['file']} has shape {bundle.embedding.shape}, the manifest says {emb['shape']}")
    bundle.tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    bundle.chat_template = bundle.file("chat_template.jinja").read_text()
    return bundle


def shrink_run_options():
    """onnxruntime RunOptions that return the CPU arena's free blocks to the system at the end of a run."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def run_options_for(plan, session: SessionOptions):
    """Arena shrinkage for a request whose planned working memory (`plan`: memory.plan_request's) is large
    (SessionOptions.arena_shrink_above): its buffers go back to the system when its runs end, while small requests
    keep the arena warm. None: the default run options."""
    if not session.cpu_mem_arena or session.arena_shrink_above is None:
        return None
    if plan.estimate.peak - plan.estimate.slack <= session.arena_shrink_above:
        return None
    return shrink_run_options()
