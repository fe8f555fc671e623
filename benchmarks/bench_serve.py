"""Serving load test: C concurrent clients x R requests against `asdm-export serve`, with and without dynamic
batching, and with a bounded queue, in one run on one machine (throughput ratio, p50 / p95 latency, failures,
requests refused as busy).

The model is the toy-world pipeline exported with a UNet batch profile large enough for the batch (guidance
doubles it), served on ONNX Runtime CPU by one instance; "without batching" is the same server with
--max-batch 1; "bounded queue" adds --max-queue Q to dynamic batching. Every client sends its requests one
after another (a new one when the last returned; after a refusal, a second later, as a client that backs off),
each with its own prompt and seed, and stops at R requests or at --time-limit.

    python benchmarks/bench_serve.py [--clients 16] [--requests 8] [--max-batch 8] [--max-queue 4]
                                     [--out bench-serve]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from bench_export import machine

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")


BACKOFF = 1.0  # seconds a client waits after the server said it is busy


def load(url: str, clients: int, requests: int, time_limit: float, steps: int | None) -> dict:
    from asdm_export.errors import Busy
    from asdm_export.serve.client import Client

    latencies, failures, refused, lock = [], [], [], threading.Lock()
    deadline = time.monotonic() + time_limit

    def client(k: int) -> None:
        with Client(url, timeout=time_limit) as c:
            for r in range(requests):
                if time.monotonic() > deadline:
                    return
                prompt = f"a {COLOURS[(k + r) % 4]} {SHAPES[(k * 3 + r) % 4]}"
                t0 = time.perf_counter()
                try:
                    c.generate(prompt, seed=1000 * k + r, steps=steps)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except Busy:
                    with lock:
                        refused.append(time.perf_counter() - t0)
                    time.sleep(BACKOFF)
                except Exception as err:  # noqa: BLE001 - counted, and the first few shown
                    with lock:
                        failures.append(str(err))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies) + len(failures) + len(refused), "ok": len(latencies),
            "failed": len(failures), "failures": failures[:3], "refused": len(refused),
            "refusal_seconds": max(refused, default=0.0), "seconds": wall, "throughput": len(latencies) / wall,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:toyworld")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="Requests per client.")
    ap.add_argument("--max-batch", type=int, default=8, help="Dynamic batching's largest batch (requests).")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="The batcher's queue delay.")
    ap.add_argument("--max-queue", type=int, default=4, help="The bounded queue's size (requests).")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of the server's instance (0: all cores).")
    ap.add_argument("--steps", type=int, default=None, help="Denoising steps per image (default: the model's).")
    ap.add_argument("--time-limit", type=float, default=900.0, help="Seconds per configuration, at most.")
    ap.add_argument("--out", type=Path, default=Path("bench-serve"))
    args = ap.parse_args()

    from asdm_export.export import export_bundle
    from asdm_export.serve import serve

    args.out.mkdir(parents=True, exist_ok=True)
    # one bundle per model and batch: a later run with another --model must not reuse (and be labelled with) this one
    bundle = args.out / f"bundle-{args.model.replace(':', '-').replace('/', '-')}-b{args.max_batch}"
    if not (bundle / "manifest.json").is_file():
        b = 2 * args.max_batch
        export_bundle(args.model, bundle, batch=(1, b, b), overwrite=True)
    threads = args.threads or __import__("os").cpu_count()
    rows = {}
    configs = (("without batching", 1, 0), ("dynamic batching", args.max_batch, 0),
               ("bounded queue", args.max_batch, args.max_queue))
    for name, max_batch, max_queue in configs:
        t0 = time.perf_counter()
        server = serve(bundle, threads=threads, max_batch=max_batch, delay_us=int(args.delay_ms * 1000),
                       max_queue=max_queue, log_file=args.out / f"server-{max_batch}-{max_queue}.log")
        started = time.perf_counter() - t0
        try:
            with_warm = load(server.url, 1, 1, args.time_limit, args.steps)  # first request's one-off costs
            assert with_warm["failed"] == 0, with_warm["failures"]
            rows[name] = {"max_batch": max_batch, "max_queue": max_queue, "start_seconds": started,
                          **load(server.url, args.clients, args.requests, args.time_limit, args.steps)}
            text = server.metrics()
            rows[name]["executions"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                           if line.startswith('nv_inference_exec_count{model="asdm"'))
        finally:
            code = server.stop()  # a failed warm-up or load has no row: its own error is what the run says
        rows[name]["exit_code"] = code
        r = rows[name]
        print(f"{name}: {r['ok']}/{r['requests']} ok in {r['seconds']:.1f} s, {r['throughput']:.2f} images/s, "
              f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, {r['refused']} refused, {r['executions']:.0f} "
              "executions", flush=True)
    ratio = rows["dynamic batching"]["throughput"] / rows["without batching"]["throughput"]
    result = {"machine": machine(), "model": args.model, "clients": args.clients, "requests": args.requests,
              "threads": threads, "delay_ms": args.delay_ms, "rows": rows, "throughput_ratio": ratio}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nmachine: {machine()}; {args.model} on ONNX Runtime CPU, one instance of {threads} threads; "
          f"{args.clients} clients x {args.requests} requests\n")
    print("| server | images/s | p50 latency s | p95 latency s | failed | refused (busy; slowest refusal s) | "
          "loop executions |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        queue = f", max queue {r['max_queue']}" if r["max_queue"] else ""
        print(f"| {name} (max batch {r['max_batch']}{queue}) | {r['throughput']:.2f} | {r['p50']:.2f} | "
              f"{r['p95']:.2f} | {r['failed']} of {r['requests']} | {r['refused']} ({r['refusal_seconds']:.2f}) | "
              f"{r['executions']:.0f} |")
    print(f"\nbatching / without: {ratio:.2f}x throughput")


if __name__ == "__main__":
    main()
