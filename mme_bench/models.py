"""The model set a benchmark spreads its invocations over: listed from the store, named in the config, or
generated for the run as artifacts of chosen sizes (ONNX, or XGBoost and LightGBM city models).

Synthetic models are the demo's house-price graph (same input `features` [n, 6], same output `price`)
with one extra weight matrix P [6, K] on a branch that is multiplied by zero before it joins the output:
the answer is still the demo's price, but the artifact (and the model in memory) is as large as asked,
so download, load and memory pressure scale with size as they would for a real model. P is random, so
it does not compress and the .tar.gz is about the requested size.

Synthetic tree models are the demo's tree cities (gateway.demo.tree_model_files: the same houses, fitted by
XGBoost or LightGBM) with as many boosting rounds as make about the requested size; they take `input__0`
and answer `output__0`, so a benchmark mixing frameworks sends CSV (which needs no input name).
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mme_bench.config import BenchConfig, BenchConfigError, SyntheticModelsConfig

log = logging.getLogger(__name__)

SIZE_TOLERANCE = 0.05  # a synthetic artifact within 5% of the requested size is good enough


@dataclass(frozen=True)
class ModelInfo:
    key: str
    size_bytes: int
    requested_bytes: int | None = None


def synthetic_onnx(name: str, pad_columns: int, seed: int) -> bytes:
    """The demo graph for `name` plus a zero-weighted branch through a [6, pad_columns] matrix."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from gateway.demo import FEATURES, INPUT_NAME, OUTPUT_NAME, fit

    weights, intercept = fit(name)
    rng = np.random.default_rng(seed)
    pad = rng.uniform(-1.0, 1.0, size=(len(FEATURES), max(1, pad_columns))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["linear"]),
        helper.make_node("MatMul", [INPUT_NAME, "P"], ["wide"]),
        helper.make_node("ReduceSum", ["wide", "axes"], ["wide_sum"], keepdims=1),
        helper.make_node("Mul", ["wide_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["linear", "nothing"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes, name=f"synthetic_{name}",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", len(FEATURES)])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(weights.reshape(-1, 1).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([intercept], dtype=np.float32), "b"),
            numpy_helper.from_array(pad, "P"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mme-gateway-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _tar_files(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def synthetic_artifact(name: str, size_bytes: int, seed: int) -> bytes:
    """A .tar.gz of about `size_bytes`: sized from a first guess, then corrected once by the ratio seen."""
    columns = max(1, size_bytes // 24)  # 6 float32 per column
    data = _tar_files({"model.onnx": synthetic_onnx(name, columns, seed)})
    for _ in range(3):
        if abs(len(data) - size_bytes) <= SIZE_TOLERANCE * size_bytes:
            break
        columns = max(1, int(columns * size_bytes / len(data)))
        data = _tar_files({"model.onnx": synthetic_onnx(name, columns, seed)})
    return data


TREE_SIZE_TOLERANCE = 0.5  # boosting rounds come in steps; a tree artifact within 50% is kept
_MAX_ROUNDS = 5000


def synthetic_tree_artifact(name: str, framework: str, size_bytes: int) -> bytes:
    """A bare XGBoost or LightGBM house-price model for `name`, of about `size_bytes` compressed."""
    from gateway.demo import tree_model_files

    rounds, data = 10, _tar_files(tree_model_files(name, framework, rounds=10))
    for _ in range(2):  # later rounds are smaller than the first ten (the residuals shrink): correct twice
        if abs(len(data) - size_bytes) <= SIZE_TOLERANCE * size_bytes:
            break
        rounds = min(_MAX_ROUNDS, max(1, round(rounds * size_bytes / len(data))))
        data = _tar_files(tree_model_files(name, framework, rounds=rounds))
    return data


def _make(name: str, framework: str, size_bytes: int, seed: int) -> bytes:
    if framework == "onnx":
        return synthetic_artifact(name, size_bytes, seed)
    return synthetic_tree_artifact(name, framework, size_bytes)


def build_synthetic_store(root: Path, cfg: SyntheticModelsConfig) -> list[ModelInfo]:
    """Write cfg.count artifacts into `root` (an existing one of about the right size is kept)."""
    root.mkdir(parents=True, exist_ok=True)
    models = []
    for i in range(cfg.count):
        want = cfg.sizes_bytes[i % len(cfg.sizes_bytes)]
        framework = cfg.frameworks[i % len(cfg.frameworks)]
        tolerance = SIZE_TOLERANCE if framework == "onnx" else TREE_SIZE_TOLERANCE
        key = f"{cfg.prefix}{i:04d}.tar.gz"
        path = root / key
        if not (path.exists() and abs(path.stat().st_size - want) <= tolerance * want):
            tmp = path.with_name(f".{key}.tmp")
            tmp.write_bytes(_make(f"{cfg.prefix}{i:04d}", framework, want, cfg.seed + i))
            tmp.replace(path)  # atomic: a gateway reading the store never sees half an artifact
        models.append(ModelInfo(key, path.stat().st_size, want))
    log.info("bench.synthetic_models", extra={"dir": str(root), "count": len(models),
                                              "bytes": sum(m.size_bytes for m in models)})
    return models


def resolve_models(cfg: BenchConfig, out_dir: Path) -> tuple[list[ModelInfo], str | None]:
    """The model set, most popular first, and the store directory launched gateways should serve."""
    mc = cfg.models
    store = cfg.launcher.store
    if mc.source == "synthetic":
        root = Path(mc.synthetic.dir or store or out_dir / "store")
        models = build_synthetic_store(root, mc.synthetic)
        store = str(root)
    elif mc.source == "keys":
        models = [ModelInfo(k, 0) for k in mc.keys]
    else:
        from gateway.store import open_store

        assert store is not None
        try:
            listed = open_store(store, s3_endpoint_url=cfg.launcher.s3_endpoint_url).list_keys(limit=100_000)
        except (ValueError, OSError) as exc:
            raise BenchConfigError(f"launcher.store: cannot list {store}: {exc}") from None
        models = sorted((ModelInfo(o.key, o.size) for o in listed if o.key.endswith(".tar.gz")),
                        key=lambda m: m.key)
        if not models:
            raise BenchConfigError(f"launcher.store: no .tar.gz artifacts in {store} "
                                   "(for the demo: .venv/bin/mme-gateway demo-store .demo/store)")
    if mc.limit is not None:
        models = models[: mc.limit]
    return models, store
