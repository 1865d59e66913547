"""The benchmarks, a package of small modules under short drivers (run from the repository root as
`python -m benchmarks.latency ...`; `python benchmarks/latency.py ...` works too).

Drivers: `latency` (per-stage latency against the PyTorch reference and a peer), `accuracy` (evaluation packs),
`features` (what each time-to-verdict feature buys), `serve_load` (the HTTP service under load), `gpu_check` (one
check of a GPU machine). Their pieces: `scenarios` (the latency inputs), `engines` (the runners), `stages` (the
stage definitions and the latency gate), `scoring` (accuracy's metrics and gate), `analysis` (ratios, tables and
probe bounds), `probe` (the machine's bounds), `gate` (the one baseline gate), `report` (tables, JSON, plots),
`system` (machine and process facts). `reference_worker` and `peer_worker` run in processes of their own.
"""

# 2: like-for-like stage definitions (stages.STAGE_DEFINITIONS), engine-identity keys, noise-aware gates, probe bounds
SCHEMA_VERSION = 2
