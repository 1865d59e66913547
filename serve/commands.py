"""The service's commands: serve, export-triton (registered by omniguard_edge/cli.py). Importing this module imports
no FastAPI: serve checks for the extra when it runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..runtime.commandline import EXIT_USAGE, bundle_dir, int_in


def cmd_serve(args) -> int:
    try:
        from .app import ServeConfig, serve
    except ImportError as exc:
        print(f"omniguard-edge serve needs the serve extra: pip install 'omniguard-edge[serve]' ({exc})",
              file=sys.stderr)
        return EXIT_USAGE
    config = ServeConfig(max_body_bytes=args.max_body_mb * 2**20, queue_size=args.queue_size,
                         max_batch=args.max_batch, timeout_s=args.timeout, max_concurrent=args.max_concurrent,
                         api_key=os.environ.get("OMNIGUARD_API_KEY") or None, max_streams=args.max_streams,
                         api_keys=tuple(k.strip() for k in os.environ.get("OMNIGUARD_API_KEYS", "").split(",")
                                        if k.strip()),
                         stream_idle_s=args.stream_idle, stream_lifetime_s=args.stream_lifetime,
                         stream_kv_bytes=args.stream_kv_mb * 2**20, metrics_from=tuple(args.metrics_from or ()),
                         client_streams=args.client_streams, client_stream_kv_bytes=args.client_stream_kv_mb * 2**20,
                         client_guards=args.client_guards, stream_workers=args.stream_workers,
                         stage_timings=args.stage_timings)
    serve(args.bundle, args.host, args.port, config, insecure_no_auth=args.insecure_no_auth)
    return 0


def cmd_export_triton(args) -> int:
    from .triton import export_triton

    written = export_triton(args.bundle, args.out, instances=args.instances, max_batch=args.max_batch,
                            graphs=args.graphs, mode=args.mode, overwrite=args.overwrite, engines=args.engines)
    for path in written:
        print(path)
    return 0



def register(sub) -> None:
    p = sub.add_parser("serve", help="the guard as an HTTP service: /v1/moderations (OpenAI-shaped), /v1/guard, "
                                     "/health, /ready, /metrics (needs [serve])")
    p.add_argument("--bundle", required=True, type=bundle_dir)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_in(1, 65535), default=8080)
    p.add_argument("--max-body-mb", type=int_in(1, 1024), default=32, help="largest request body, MiB (default 32)")
    p.add_argument("--queue-size", type=int_in(1, 1 << 16), default=64, help="waiting requests before 429 (64)")
    p.add_argument("--max-batch", type=int_in(1, 256), default=8, help="requests judged together (default 8)")
    p.add_argument("--max-concurrent", type=int_in(1, 1 << 16), default=256,
                   help="requests in the service at once before 429 (default 256)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run (default 60)")
    p.add_argument("--max-streams", type=int_in(1, 1 << 16), default=64, help="open /v1/streams (default 64)")
    p.add_argument("--stream-idle", type=float, default=60.0,
                   help="seconds a stream may wait for its next request before it is dropped (default 60)")
    p.add_argument("--stream-lifetime", type=float, default=600.0, help="seconds a stream may live (default 600)")
    p.add_argument("--stream-kv-mb", type=int_in(1, 1 << 24), default=2048,
                   help="MiB of decoder cache all open streams may hold together (default 2048)")
    p.add_argument("--client-streams", type=int_in(1, 1 << 16), default=8,
                   help="open streams of one client, i.e. one API key (default 8)")
    p.add_argument("--client-stream-kv-mb", type=int_in(1, 1 << 24), default=512,
                   help="MiB of decoder cache one client's streams may hold (default 512)")
    p.add_argument("--client-guards", type=int_in(1, 256), default=2,
                   help="(mode, categories) settings one client's open streams may use (default 2)")
    p.add_argument("--stream-workers", type=int_in(1, 256), default=2,
                   help="threads judging stream requests, taking the clients in turn (default 2)")
    p.add_argument("--metrics-from", nargs="+", metavar="CIDR",
                   help="networks whose TCP peers may read /metrics without the API key (a scraper's; "
                        "X-Forwarded-For is never trusted)")
    p.add_argument("--stage-timings", action="store_true",
                   help="answer each request's stage timings (they tell another client's cached media: off by default)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without an API key (OMNIGUARD_API_KEY)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-triton", help="a Triton Inference Server model repository: the guard as a Python-"
                                             "backend model (and the graphs as ONNX Runtime models)")
    p.add_argument("--bundle", required=True, type=bundle_dir)
    p.add_argument("--out", required=True, type=Path, help="the repository folder to write")
    p.add_argument("--instances", type=int_in(1, 256), default=1, help="guard model instances (default 1)")
    p.add_argument("--max-batch", type=int_in(1, 1024), default=8, help="requests per execute (default 8)")
    p.add_argument("--graphs", choices=["onnxruntime", "tensorrt"],
                   help="also the graphs as ONNX Runtime backend models, or as TensorRT ones over the native plans of "
                        "build-engines --native")
    p.add_argument("--engines", type=Path, help="--graphs tensorrt: the engine folder (default: BUNDLE.engines)")
    p.add_argument("--mode", choices=["verdict", "categories", "full"], default="categories")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_triton)
