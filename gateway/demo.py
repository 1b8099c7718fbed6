"""The demo store: one house-price model per city, as in AWS's blog post on SageMaker multi-model endpoints.

Most cities' models are linear regressions fitted with numpy on synthetic houses whose prices follow
city-specific rules, exported as a one-node-pair ONNX graph (MatMul + Add); a few are gradient-boosted trees
(XGBoost, LightGBM) fitted on the same kind of data and stored bare (`xgboost.json`, `model.txt`), so the
demo shows more than one framework. Features, in order: year built, square feet, bedrooms, bathrooms, lot
size (acres), garage spaces. ONNX cities take them as `features` and answer `price`; tree cities, as every
tree model the gateway renders, take `input__0` and answer `output__0`.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = ("year_built", "square_feet", "bedrooms", "bathrooms", "lot_acres", "garage_spaces")
INPUT_NAME = "features"
OUTPUT_NAME = "price"
TREE_CITIES = {"Portland_OR": "xgboost", "Nashville_TN": "lightgbm"}  # city -> framework
DEMO_CITIES = (
    "Chicago_IL", "Houston_TX", "LosAngeles_CA", "Seattle_WA", "Miami_FL",
    "Denver_CO", "Boston_MA", "Atlanta_GA", "Phoenix_AZ", "Austin_TX", *TREE_CITIES,
)
LATE_CITY = "NewYork_NY"  # not in the initial store: the README adds it while the gateway runs


def _rng(city: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(city.encode()).digest()[:8], "little"))


def synthetic_houses(city: str, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Houses and prices for `city`; the same city always gives the same data."""
    rng = _rng(city)
    x = np.column_stack([
        rng.integers(1950, 2021, n), rng.integers(800, 4500, n), rng.integers(1, 7, n),
        rng.choice([1.0, 1.5, 2.0, 2.5, 3.0], n), rng.uniform(0.1, 2.0, n), rng.integers(0, 4, n),
    ]).astype(np.float64)
    city_rate = rng.uniform(90, 260)  # dollars per square foot differ most between cities
    coef = np.array([rng.uniform(300, 900), city_rate, 9000, 14000, rng.uniform(20000, 60000), 11000])
    y = x @ coef - 1950 * coef[0] + rng.normal(0, 15000, n)
    return x, y


def fit(city: str) -> tuple[np.ndarray, float]:
    """Least-squares weights and intercept for `city`."""
    x, y = synthetic_houses(city)
    design = np.column_stack([x, np.ones(len(x))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    return solution[:-1], float(solution[-1])


def onnx_model(city: str) -> onnx.ModelProto:
    weights, intercept = fit(city)
    graph = helper.make_graph(
        nodes=[helper.make_node("MatMul", [INPUT_NAME, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], [OUTPUT_NAME])],
        name=f"house_price_{city}",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", len(FEATURES)])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(weights.reshape(-1, 1).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([intercept], dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mme-gateway-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def predict(city: str, houses: np.ndarray) -> np.ndarray:
    """What the city's model answers, computed in numpy (tests compare Triton's answer with this)."""
    weights, intercept = fit(city)
    return (houses.astype(np.float32) @ weights.astype(np.float32).reshape(-1, 1)) + np.float32(intercept)


def tree_model_files(city: str, framework: str, rounds: int = 20) -> dict[str, bytes]:
    """The city's houses fitted with gradient-boosted trees: {file name: bytes} of a bare artifact."""
    x, y = synthetic_houses(city)
    if framework == "xgboost":
        import xgboost

        booster = xgboost.train({"max_depth": 4, "eta": 0.3, "nthread": 1}, xgboost.DMatrix(x, y),
                                num_boost_round=rounds)
        return {"xgboost.json": bytes(booster.save_raw("json"))}
    if framework == "lightgbm":
        import lightgbm

        trees = lightgbm.train({"objective": "regression", "num_leaves": 15, "num_threads": 1, "verbose": -1,
                                "deterministic": True}, lightgbm.Dataset(x, y), num_boost_round=rounds)
        return {"model.txt": trees.model_to_string().encode()}
    raise ValueError(f"no demo tree model for framework {framework!r}")


def artifact_files(city: str) -> dict[str, bytes]:
    """What the city's artifact holds: its tree model for a tree city, else its ONNX graph."""
    if city in TREE_CITIES:
        return tree_model_files(city, TREE_CITIES[city])
    return {"model.onnx": onnx_model(city).SerializeToString()}


def write_artifact(city: str, dest: Path) -> Path:
    """`dest` becomes a .tar.gz holding the city's bare model file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in artifact_files(city).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(dest)  # atomic: a running gateway never sees half an artifact
    return dest


def build_store(root: Path, cities: tuple[str, ...] = DEMO_CITIES) -> list[Path]:
    """Write the cities' artifacts that are not in `root` yet (existing ones keep their ETag)."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_artifact(city, path) for city in cities if not (path := root / f"{city}.tar.gz").exists()]
