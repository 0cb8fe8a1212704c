"""Provider choice (CUDA only when really usable) and EncoderSession on a small real ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aet.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    DeviceError,
    EncoderSession,
    ModelLoadError,
    RuntimeOptions,
    choose_providers,
    cuda_usable,
    resolve_providers,
)

TENSORRT = "TensorrtExecutionProvider"
HAS_NVIDIA_DEVICE = any(Path("/dev").glob("nvidia[0-9]*"))
ROW_SHAPE = (1, 4, 4)
ONE_THREAD = RuntimeOptions(intra_op_threads=1, inter_op_threads=1)


@pytest.mark.parametrize(
    "available, usable, chosen",
    [
        ([TENSORRT, CUDA_PROVIDER, CPU_PROVIDER], True, [CUDA_PROVIDER, CPU_PROVIDER]),
        ([TENSORRT, CUDA_PROVIDER, CPU_PROVIDER], False, [CPU_PROVIDER]),
        ([CPU_PROVIDER], True, [CPU_PROVIDER]),
        ([CPU_PROVIDER], False, [CPU_PROVIDER]),
    ],
)
def test_choose_providers(available, usable, chosen):
    assert choose_providers(available, usable) == chosen


def test_cuda_is_not_usable_without_the_provider():
    assert cuda_usable([CPU_PROVIDER]) is False


@pytest.mark.skipif(HAS_NVIDIA_DEVICE, reason="this machine has an NVIDIA device")
def test_without_a_gpu_auto_picks_cpu_silently_and_cuda_is_refused(capfd):
    assert cuda_usable([CUDA_PROVIDER, CPU_PROVIDER]) is False
    assert resolve_providers("auto") == [CPU_PROVIDER]
    assert resolve_providers("cpu") == [CPU_PROVIDER]
    assert capfd.readouterr() == ("", "")  # no error spam
    with pytest.raises(DeviceError, match=r"device: expected a usable CUDA GPU for 'cuda'"):
        resolve_providers("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError, match=r"device: expected one of auto, cpu, cuda, got 'tpu'"):
        resolve_providers("tpu")


def write_encoder(
    path: Path,
    weights: np.ndarray,
    input_name: str = "pixels",
    output_name: str = "embedding",
    output_dim: int | str | None = None,
) -> Path:
    """pixels (batch, 1, 4, 4) in [0, 16] -> flatten(pixels / 16) @ weights: a tiny encoder;
    its output declared as (batch, `output_dim`), by default the weights' columns."""
    graph = helper.make_graph(
        [
            helper.make_node("Div", [input_name, "raw_max"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], [output_name]),
        ],
        "tiny_encoder",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *ROW_SHAPE])],
        [
            helper.make_tensor_value_info(
                output_name,
                TensorProto.FLOAT,
                ["batch", weights.shape[1] if output_dim is None else output_dim],
            )
        ],
        [
            numpy_helper.from_array(np.array(16, np.float32), "raw_max"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def weights():
    return np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)


def test_encoder_session_matches_the_graph_on_cpu(tmp_path, weights):
    path = write_encoder(tmp_path / "model.onnx", weights)
    session = EncoderSession(path, "pixels", "embedding", ROW_SHAPE, [CPU_PROVIDER], ONE_THREAD)
    assert session.provider == CPU_PROVIDER
    session.warm_up(ROW_SHAPE, (1, 8))
    pixels = np.random.default_rng(1).uniform(0, 16, (5, *ROW_SHAPE)).astype(np.float32)
    got = session.run(pixels)["embedding"]
    np.testing.assert_allclose(got, (pixels / 16).reshape(5, -1) @ weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "names, row_shape, message",
    [
        (
            ("image", "embedding"),
            ROW_SHAPE,
            r"input: expected 'image' \(model card\), got \['pixels'\]",
        ),
        (
            ("pixels", "code"),
            ROW_SHAPE,
            r"output: expected 'code' \(model card\), got \['embedding'\]",
        ),
        (
            ("pixels", "embedding"),
            (1, 8, 8),
            r"input shape: expected \[batch, 1, 8, 8\] \(model card\), got \['batch', 1, 4, 4\]",
        ),
    ],
)
def test_graph_that_does_not_match_its_card_is_refused(
    tmp_path, weights, names, row_shape, message
):
    path = write_encoder(tmp_path / "model.onnx", weights)
    with pytest.raises(ModelLoadError, match=message):
        EncoderSession(path, *names, row_shape, [CPU_PROVIDER], ONE_THREAD)


@pytest.mark.parametrize("declared", [None, "code"])  # a fixed or a symbolic (inferred) width
def test_graph_whose_output_is_not_the_card_embedding_dim_is_refused(tmp_path, weights, declared):
    """FAULTS.md "Model cards": card 16, graph 3 columns: refused at load, not served."""
    path = write_encoder(tmp_path / "model.onnx", weights, output_dim=declared)
    with pytest.raises(
        ModelLoadError,
        match=r"output shape: expected \[batch, 16\] \(model card output.embedding_dim\), "
        r"got \['batch', 3\]",
    ):
        EncoderSession(
            path, "pixels", "embedding", ROW_SHAPE, [CPU_PROVIDER], ONE_THREAD, embedding_dim=16
        )
    EncoderSession(
        path, "pixels", "embedding", ROW_SHAPE, [CPU_PROVIDER], ONE_THREAD, embedding_dim=3
    )


def test_unloadable_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not an onnx graph")
    with pytest.raises(ModelLoadError, match=rf"{path}: onnxruntime cannot load it"):
        EncoderSession(path, "pixels", "embedding", ROW_SHAPE, [CPU_PROVIDER], ONE_THREAD)


def test_thread_counts_reach_onnxruntime(tmp_path, weights, monkeypatch):
    seen = []
    original = ort.InferenceSession

    def recording_session(path, options, providers):
        seen.append((options.intra_op_num_threads, options.inter_op_num_threads))
        return original(path, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    EncoderSession(
        write_encoder(tmp_path / "model.onnx", weights),
        "pixels",
        "embedding",
        ROW_SHAPE,
        [CPU_PROVIDER],
        RuntimeOptions(intra_op_threads=2, inter_op_threads=1),
    )
    assert seen == [(2, 1)]
