"""The demo store: one house-price model per city, as in AWS's blog post on SageMaker multi-model endpoints.

Each city's model is a linear regression fitted with numpy on synthetic houses whose prices follow
city-specific rules, exported as a one-node-pair ONNX graph (MatMul + Add). Features, in order:
year built, square feet, bedrooms, bathrooms, lot size (acres), garage spaces.
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
DEMO_CITIES = (
    "Chicago_IL", "Houston_TX", "LosAngeles_CA", "Seattle_WA", "Miami_FL",
    "Denver_CO", "Boston_MA", "Atlanta_GA", "Phoenix_AZ", "Austin_TX",
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


def write_artifact(city: str, dest: Path) -> Path:
    """`dest` becomes a .tar.gz holding the city's bare `model.onnx`."""
    data = onnx_model(city).SerializeToString()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tmp.replace(dest)  # atomic: a running gateway never sees half an artifact
    return dest


def build_store(root: Path, cities: tuple[str, ...] = DEMO_CITIES) -> list[Path]:
    """Write the cities' artifacts that are not in `root` yet (existing ones keep their ETag)."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_artifact(city, path) for city in cities if not (path := root / f"{city}.tar.gz").exists()]
