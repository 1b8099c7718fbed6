"""Which instance kind rendered models get, from the machine or the operator."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.demo import onnx_model
from gateway.instance_kind import KIND_CPU, KIND_GPU, choose_instance_kinds
from gateway.render import OnnxBackend, RenderOptions, render_model_dir

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ONLY = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("requested", "gpu", "providers", "native", "runner"),
    [
        ("auto", False, CUDA, KIND_CPU, KIND_CPU),  # no GPU: nothing runs on one, whatever onnxruntime has
        ("auto", True, CUDA, KIND_GPU, KIND_GPU),
        ("auto", True, CPU_ONLY, KIND_GPU, KIND_CPU),  # the runner cannot use the GPU without the CUDA provider
        ("cpu", True, CUDA, KIND_CPU, KIND_CPU),  # the operator's word wins
        ("gpu", False, CUDA, KIND_GPU, KIND_GPU),  # e.g. an external Triton whose GPU NVML here cannot see
        ("gpu", True, CPU_ONLY, KIND_GPU, KIND_CPU),
    ],
)
def test_choice(requested: str, gpu: bool, providers: list[str], native: str, runner: str) -> None:
    kinds = choose_instance_kinds(requested, gpu, providers)
    assert (kinds.native, kinds.runner) == (native, runner)
    assert kinds.reason


def test_the_reason_says_why_the_runner_stays_on_the_cpu() -> None:
    kinds = choose_instance_kinds("auto", True, CPU_ONLY)
    assert "CUDAExecutionProvider" in kinds.reason and "onnxruntime" in kinds.reason


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, cpu, gpu"):
        choose_instance_kinds("tpu", True, CUDA)


@pytest.mark.parametrize(
    ("backend", "kinds", "expected"),
    [
        (OnnxBackend.ONNXRUNTIME, (KIND_GPU, KIND_CPU), KIND_GPU),
        (OnnxBackend.PYTHON, (KIND_GPU, KIND_GPU), KIND_GPU),
        (OnnxBackend.PYTHON, (KIND_GPU, KIND_CPU), KIND_CPU),
    ],
)
def test_bare_onnx_renders_the_chosen_kind(tmp_path, backend: OnnxBackend, kinds: tuple[str, str], expected: str) -> None:
    (tmp_path / "model.onnx").write_bytes(onnx_model("Austin_TX").SerializeToString())
    options = RenderOptions(onnx_backend=backend, instance_kind=kinds[0], runner_instance_kind=kinds[1])
    root, rendered = render_model_dir(tmp_path, "m", "m.tar.gz", options)
    config = text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == [expected]
    assert rendered.instance_kind == expected


def test_an_artifacts_onnxruntime_config_moved_to_the_runner_takes_the_runner_kind(tmp_path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(onnx_model("Austin_TX").SerializeToString())
    (tmp_path / "config.pbtxt").write_text('backend: "onnxruntime"\ninstance_group [ { kind: KIND_GPU gpus: [0] } ]\n')
    options = RenderOptions(onnx_backend=OnnxBackend.PYTHON, instance_kind=KIND_GPU, runner_instance_kind=KIND_CPU)
    root, rendered = render_model_dir(tmp_path, "m", "m.tar.gz", options)
    config = text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.backend == "python"
    assert [(mc.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in config.instance_group] == [(KIND_CPU, [])]
