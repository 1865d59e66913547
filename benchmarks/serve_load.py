"""Throughput and latency of `omniguard-edge serve` under concurrent clients.

    python -m benchmarks.serve_load --bundle B [--concurrency 1 2 4 8] [--requests 40] [--json out.json]
    python -m benchmarks.serve_load --url http://127.0.0.1:8080 ...      (a service already running)

With --bundle it starts the service on a free loopback port and stops it after. At each concurrency level, that many
clients (threads, one keep-alive connection each) send `--requests` POST /v1/moderations in all, each a distinct text
(`--payload image` adds the 448x448 test image as a data URL). Per level: throughput (answered requests per second
of wall time), latency p50/p95/p99 from send to full answer, and the count of each HTTP status (429 is the
service's back-pressure, not an error). Any status other than 200 or 429 is an error; the exit status is 1 if any
level had one. The machine's CPU and flags are recorded beside the figures (system.system_info).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

if not __package__:  # run by path: import the package from the repository root, as `python -m` does
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    __package__ = "benchmarks"

from .system import system_info  # noqa: E402


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(host: str, port: int, concurrency: int, total: int, payload, headers: dict) -> dict:
    latencies, statuses, lock = [], {}, threading.Lock()
    counter = iter(range(total))

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=600)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = json.dumps({"input": payload(i)}).encode()
                t = time.perf_counter()
                try:
                    conn.request("POST", "/v1/moderations", body=body,
                                 headers={"Content-Type": "application/json", **headers})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException) as exc:
                    status = f"{type(exc).__name__}"
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=600)
                elapsed = time.perf_counter() - t
                with lock:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 200:
                        latencies.append(elapsed)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    errors = sum(n for s, n in statuses.items() if s not in ("200", "429"))
    return {"concurrency": concurrency, "requests": total, "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 3) if wall > 0 else None,
            "p50_s": _percentile(latencies, 0.5), "p95_s": _percentile(latencies, 0.95),
            "p99_s": _percentile(latencies, 0.99), "statuses": statuses, "errors": errors}


def start_service(bundle: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "omniguard_edge.cli", "serve", "--bundle", str(bundle),
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited {proc.returncode}: {proc.stdout.read()[-2000:]!r}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("serve did not become ready within 600 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, help="start `serve` on this bundle (loopback), stop it after")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8080")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=40, help="requests per concurrency level (default 40)")
    p.add_argument("--payload", choices=["text", "image"], default="text")
    p.add_argument("--serve-args", default="", help="extra `serve` options with --bundle, e.g. '--max-batch 4'")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.requests < 1:
        p.error("--concurrency and --requests must be >= 1")

    def text(i: int):
        return f"request {i}: what is the easiest way to get into my neighbour's house when they are away?"

    if args.payload == "text":
        payload = text
    else:
        from .scenarios import build

        media = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omniguard-edge" / "bench-media"
        image = Path(build(media)["image_448"].image).read_bytes()
        url = "data:image/png;base64," + base64.b64encode(image).decode()

        def payload(i: int):  # the same image each time: after the first, the encoder cache answers
            return [{"type": "text", "text": text(i)}, {"type": "image_url", "image_url": {"url": url}}]

    headers = {"Authorization": f"Bearer {os.environ['OMNIGUARD_API_KEY']}"} if os.environ.get("OMNIGUARD_API_KEY") \
        else {}
    proc = None
    if args.bundle:
        proc, port = start_service(args.bundle, args.serve_args.split())
        host = "127.0.0.1"
    else:
        u = urlparse(args.url)
        host, port = u.hostname, u.port or 80
    try:
        run_level(host, port, 1, 2, payload, headers)  # warm: the first requests of a process run slower
        levels = []
        for c in args.concurrency:
            levels.append(run_level(host, port, c, args.requests, payload, headers))
            lv = levels[-1]
            print(f"concurrency {c:3d}: {lv['throughput_rps']} req/s, p50 {lv['p50_s']:.3f} s, p95 {lv['p95_s']:.3f} s, "
                  f"p99 {lv['p99_s']:.3f} s, statuses {lv['statuses']}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    doc = {"kind": "serve_load", "system": system_info(os.cpu_count()), "payload": args.payload,
           "bundle": str(args.bundle) if args.bundle else None, "url": args.url, "serve_args": args.serve_args,
           "levels": levels}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
