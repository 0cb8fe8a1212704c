"""Serve a model repository with our server and its KServe v2 API, for `compare_triton.py`.

Wires the parts the way `aet serve` does once the KServe API is registered there (the registry,
its batchers, the KServe servicer, statistics); prints `READY <port>` when every model is
loaded, then serves until SIGTERM or SIGINT and stops gracefully.

    python bench/peers/serve_ours.py --repository REPO --port 8001 --threads 1
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from server.app import ServeConfig, ServiceBinding, build_server
from server.kserve_service import SERVICE_NAME, InferenceService
from server.metrics import ServingMetrics
from server.models import ModelRegistry
from server.reload import RepositoryReloader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=256, help="rows per run")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--no-dynamic-batching", action="store_true",
                        help="run every request alone (the 'bare server' baseline)")
    args = parser.parse_args()

    config = ServeConfig(repository=args.repository, port=args.port,
                         intra_op_threads=args.threads, inter_op_threads=1,
                         max_batch_size=args.max_batch_size,
                         max_queue_delay_ms=args.max_queue_delay_us / 1e3,
                         dynamic_batching=not args.no_dynamic_batching, grace_period=5.0)
    registry = ModelRegistry(config.runtime, config.batching)
    metrics = ServingMetrics(config.max_batch_size)
    metrics.watch_registry(registry)
    reloader = RepositoryReloader(registry, config.repository)
    kserve = InferenceService(registry, reloader, metrics)
    running = build_server(config, registry, [ServiceBinding(SERVICE_NAME, kserve.add_to_server)])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    reloader.sync()
    print(f"READY {running.port}", flush=True)
    stop.wait()
    running.stop(config.grace_period)
    return 0


if __name__ == "__main__":
    sys.exit(main())
