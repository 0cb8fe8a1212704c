"""Serve one ONNX encoder with PyTriton (Triton 2.51 inside the nvidia-pytriton wheel).

Run by `compare_triton.py` with the interpreter of a separate virtualenv that holds
`nvidia-pytriton==0.7.*` and `onnxruntime` (PyTriton pins numpy < 2 and protobuf < 5, which the
project's own environment does not allow). The model is an onnxruntime callable behind
Triton's dynamic batcher, the same graph our server loads. Prints `READY` once Triton serves,
then blocks until SIGTERM or SIGINT.

    python pytriton_server.py --onnx model.onnx --name digits --grpc-port 8101 --http-port 8100
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig


def _libpython_first() -> None:
    """Triton's Python-backend stub links libpython: put this interpreter's own first.

    The loader reads LD_LIBRARY_PATH at process start, so re-exec once with it set.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *filter(None, paths)])
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the ONNX encoder to serve")
    parser.add_argument("--name", required=True, help="model name clients use")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    _libpython_first()

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    graph_input, graph_output = session.get_inputs()[0], session.get_outputs()[0]

    @batch
    def infer(**inputs):
        pixels = inputs[graph_input.name]
        return {graph_output.name: session.run(None, {graph_input.name: pixels})[0]}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        allow_metrics=False,
    )
    # Unrestricted endpoints: perf_analyzer reads ModelStatistics, restricted by default.
    with Triton(
        config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])
    ) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[
                Tensor(name=graph_input.name, dtype=np.float32, shape=tuple(graph_input.shape[1:]))
            ],
            outputs=[
                Tensor(
                    name=graph_output.name, dtype=np.float32, shape=tuple(graph_output.shape[1:])
                )
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        print("READY", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
