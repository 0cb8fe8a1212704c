"""What the novelty score costs, in-process and served, and what it costs requests without it.

    python bench/score.py            # a few minutes on 2 busy cores
    python bench/score.py --quick    # shorter rounds

Two encoders with random weights (timing does not depend on them), exported by
`training.export` twice: as today's exporter wrote them (the embedding alone) and with the
score (embedding + reconstruction_error: encoder and decoder in one graph):
- tiny: the shipped digits architecture, stacked 64-256-64-8, tied weights, BCE;
- large: 784-1000-500-250-32, tied weights, BCE, on 1x28x28.

1. In-process (onnxruntime, one thread, `aet.runtime.EncoderSession`): milliseconds per
   batch of 1, 64 and 256 rows for the embedding-only graph of old, an embedding request on
   the graph with the score (which runs the graph cut down to the encoder) and a scored run.
   Targets: embedding-only on the new graph = the old graph; scored <= 1.5x embedding-only.
2. Served (a child `aet serve`, one onnxruntime thread): p50 of unary Embed calls, batch 1 and
   64, on the old graph vs embedding-only and scored requests on the new one.
Sides alternate in short rounds, so load from other processes hits them alike. Writes
bench/results/score.json and prints a table with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]  # runnable from a checkout without installing

import grpc  # noqa: E402
import torch  # noqa: E402

from aet.clients.server_process import temporary_server  # noqa: E402
from aet.proto import embedding_pb2, embedding_pb2_grpc  # noqa: E402
from aet.proto.codec import encode_tensor  # noqa: E402
from aet.repository import (  # noqa: E402
    SCORE_NAME,
    SCORE_PERCENTILES,
    InputSpec,
    ModelCard,
    OutputSpec,
    ScoreSpec,
    write_version,
)
from aet.runtime import EncoderSession, RuntimeOptions  # noqa: E402
from aet.training.export import ExportedEncoder, Scale, library_versions, to_onnx  # noqa: E402
from aet.training.models import ModelConfig, build_autoencoder  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "score.json"
ENCODERS = {  # name: (hidden sizes, code size, row shape, raw max)
    "tiny": ((256, 64), 8, (1, 8, 8), 16.0),
    "large": ((1000, 500, 250), 32, (1, 28, 28), 255.0),
}
BATCHES = (1, 64, 256)


def export_pair(root: Path, name: str) -> None:
    """`<name>-old/1` (embedding only, today's graph) and `<name>/1` (with the score)."""
    hidden, code, shape, raw_max = ENCODERS[name]
    torch.manual_seed(0)
    config = ModelConfig(architecture="stacked", hidden_sizes=hidden, code_size=code)
    model = build_autoencoder(config, shape).eval()
    for folder, with_score in ((f"{name}-old", False), (name, True)):
        encoder = ExportedEncoder(model, Scale(raw_max), with_score=with_score).eval()
        graph = to_onnx(encoder, torch.zeros(2, *shape), opset=20).SerializeToString()
        percentiles = dict.fromkeys(SCORE_PERCENTILES, 0.0)  # uncalibrated: random weights
        score = ScoreSpec(SCORE_NAME, "float32", "bench", "none", 1, percentiles)
        score = score if with_score else None
        card = ModelCard.draft(
            folder,
            "stacked",
            InputSpec("pixels", shape, "float32", (0.0, raw_max)),
            OutputSpec("embedding", "float32", code),
            hyperparameters=config.to_dict(),
            preprocessing=[f"scale: pixels / {raw_max:g}", "flatten"],
            dataset={"name": "none (random weights, for benchmarking)"},
            opset=20,
            library_versions=library_versions(),
            score=score,
        )
        write_version(root, folder, graph, card)


def pixels(name: str, rows: int) -> np.ndarray:
    _, _, shape, raw_max = ENCODERS[name]
    return (np.random.default_rng(1).random((rows, *shape)) * raw_max).astype(np.float32)


def timed(call, seconds: float) -> float:
    """Median seconds of `call()` over `seconds` of repeats (at least 5)."""
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def in_process(root: Path, name: str, rounds: int, seconds: float) -> dict:
    def session(folder: str, score: bool) -> EncoderSession:
        return EncoderSession(
            root / folder / "1" / "model.onnx",
            "pixels",
            "embedding",
            ENCODERS[name][2],
            ["CPUExecutionProvider"],
            RuntimeOptions(intra_op_threads=1, inter_op_threads=1),
            score_name=SCORE_NAME if score else None,
        )

    old, new = session(f"{name}-old", False), session(name, True)
    result = {}
    for rows in BATCHES:
        batch = pixels(name, rows)
        sides = {
            "old_embedding": lambda b=batch: old.run(b),
            "new_embedding": lambda b=batch: new.run(b),
            "new_scored": lambda b=batch: new.run(b, new.output_sets[-1]),
        }
        samples: dict[str, list[float]] = {side: [] for side in sides}
        for round_ in range(rounds):
            order = list(sides)[round_ % 3 :] + list(sides)[: round_ % 3]
            for side in order:
                samples[side].append(timed(sides[side], seconds))
        ms = {side: 1e3 * float(np.median(values)) for side, values in samples.items()}
        ms["scored_over_embedding"] = ms["new_scored"] / ms["new_embedding"]
        ms["new_over_old_embedding"] = ms["new_embedding"] / ms["old_embedding"]
        result[rows] = ms
    return result


def served(root: Path, name: str, rounds: int, seconds: float) -> dict:
    threads = ("--intra-op-threads", "1", "--inter-op-threads", "1")
    result = {}
    with temporary_server(root, "aet-bench-score-", *threads, model=name) as server:
        server.wait_until_serving(f"{name}-old")  # loaded one after the other
        with grpc.insecure_channel(server.target) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            for rows in (1, 64):
                inputs = encode_tensor(pixels(name, rows))
                scored = embedding_pb2.EmbedOptions(reconstruction_error=True)
                requests = {
                    "old_embedding": embedding_pb2.EmbedRequest(model=f"{name}-old", inputs=inputs),
                    "new_embedding": embedding_pb2.EmbedRequest(model=name, inputs=inputs),
                    "new_scored": embedding_pb2.EmbedRequest(
                        model=name, inputs=inputs, options=scored
                    ),
                }
                samples: dict[str, list[float]] = {side: [] for side in requests}
                for round_ in range(rounds):
                    order = list(requests)[round_ % 3 :] + list(requests)[: round_ % 3]
                    for side in order:
                        request = requests[side]
                        samples[side].append(timed(lambda r=request: stub.Embed(r), seconds))
                result[rows] = {
                    side: 1e3 * float(np.median(values)) for side, values in samples.items()
                }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short rounds (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file ({RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, seconds = (3, 0.2) if args.quick else (9, 0.5)
    load_before = os.getloadavg()[0]
    results: dict = {"rounds": rounds, "seconds_per_side_and_round": seconds}
    with tempfile.TemporaryDirectory(prefix="aet-bench-score-") as folder:
        root = Path(folder)
        for name in ENCODERS:
            export_pair(root, name)
        results["in_process_ms"] = {
            name: in_process(root, name, rounds, seconds) for name in ENCODERS
        }
        results["served_p50_ms"] = {name: served(root, name, rounds, seconds) for name in ENCODERS}
    results["load_average"] = {"start": load_before, "end": os.getloadavg()[0]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print("in-process ms per batch: old graph / new, embedding only / new, scored (ratio)")
    for name, by_rows in results["in_process_ms"].items():
        for rows, ms in by_rows.items():
            print(
                f"  {name:5} batch {rows:3}: {ms['old_embedding']:.3f} / {ms['new_embedding']:.3f}"
                f" / {ms['new_scored']:.3f} (scored {ms['scored_over_embedding']:.2f}x, "
                f"new embedding {ms['new_over_old_embedding']:.2f}x old)"
            )
    print("served p50 ms per unary Embed: old graph / new, embedding only / new, scored")
    for name, by_rows in results["served_p50_ms"].items():
        for rows, ms in by_rows.items():
            print(
                f"  {name:5} batch {rows:3}: {ms['old_embedding']:.3f} / {ms['new_embedding']:.3f}"
                f" / {ms['new_scored']:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
