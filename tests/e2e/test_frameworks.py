"""Tree models from a bare artifact on the bundled Triton (Python backend only): XGBoost and LightGBM through
their runners, a scikit-learn random forest converted to ONNX at staging. Each is trained here on synthetic
data, uploaded as nothing but its model file, and must answer over KServe HTTP, KServe gRPC and SageMaker CSV
exactly what its own library predicts. A pickle is refused unless the operator allows it.

Models live under `frameworks/` in the store so they never disturb the other modules' counts.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
from typing import Callable, Iterator

import lightgbm
import numpy as np
import pytest
import skops.io
import tritonclient.grpc as grpcclient
import xgboost
from sklearn.ensemble import RandomForestRegressor

from gateway.demo import TREE_CITIES, build_store, synthetic_houses, tree_model_files
from tests.conftest import BUCKET, PREFIX
from tests.helpers import GatewayProcess, http, tar_gz

FEATURES = 6
XGB, LGB, SKL, PICKLED = ("frameworks/xgb.tar.gz", "frameworks/lgb.tar.gz", "frameworks/rf.tar.gz",
                          "frameworks/rf-pickle.tar.gz")


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, size=(n, FEATURES)).astype(np.float32)
    y = 3 * x[:, 0] - 2 * x[:, 1] * x[:, 2] + np.sin(x[:, 3]) * 10 + rng.normal(0, 0.5, n)
    return x, y


TRAIN_X, TRAIN_Y = _data(400, 1)
ROWS, _ = _data(7, 2)  # rows none of the models saw


class Trained:
    """The three models, fitted once for the module, with what each library predicts for `ROWS`."""

    def __init__(self) -> None:
        self.xgb = xgboost.train({"max_depth": 3, "eta": 0.5}, xgboost.DMatrix(TRAIN_X, TRAIN_Y), num_boost_round=5)
        self.lgb = lightgbm.train({"objective": "regression", "num_leaves": 7, "verbose": -1},
                                  lightgbm.Dataset(TRAIN_X, TRAIN_Y), num_boost_round=5)
        self.rf = RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0).fit(TRAIN_X, TRAIN_Y)
        self.expected: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            XGB: lambda rows: self.xgb.predict(xgboost.DMatrix(rows)),
            LGB: lambda rows: self.lgb.predict(rows),
            SKL: lambda rows: self.rf.predict(rows),
            PICKLED: lambda rows: self.rf.predict(rows),
        }


@pytest.fixture(scope="module")
def trained(s3) -> Trained:  # type: ignore[no-untyped-def]
    """Upload once per module (a re-made gzip carries a new ETag, hence a reload)."""
    models = Trained()
    artifacts = {
        XGB: {"xgboost.json": bytes(models.xgb.save_raw("json"))},
        LGB: {"model.txt": models.lgb.model_to_string().encode()},
        SKL: {"model.skops": skops.io.dumps(models.rf)},
        PICKLED: {"model.pkl": pickle.dumps(models.rf)},
    }
    for key, files in artifacts.items():
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=tar_gz(files))
    return models


def _kserve_http(gw: GatewayProcess, key: str, rows: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "input__0", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()
    status, raw, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", body)
    return status, json.loads(raw)


def _only_output(answer: dict) -> np.ndarray:
    (output,) = answer["outputs"]
    return np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])


@pytest.mark.parametrize("key", [XGB, LGB, SKL])
def test_each_framework_answers_kserve_http_as_its_library_predicts(s3_gateway: GatewayProcess, trained: Trained,
                                                                     key: str) -> None:
    status, answer = _kserve_http(s3_gateway, key, ROWS)
    assert status == 200, answer
    got = _only_output(answer)
    assert got.shape == (len(ROWS), 1)
    np.testing.assert_allclose(got.ravel(), trained.expected[key](ROWS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key", [XGB, LGB, SKL])
def test_each_framework_answers_grpc_as_its_library_predicts(s3_gateway: GatewayProcess, trained: Trained,
                                                              key: str) -> None:
    client = grpcclient.InferenceServerClient(url=s3_gateway.grpc_url)
    try:
        inp = grpcclient.InferInput("input__0", list(ROWS.shape), "FP32")
        inp.set_data_from_numpy(ROWS)
        result = client.infer(key, [inp])
        (output,) = result.get_response().outputs
        got = result.as_numpy(output.name)
    finally:
        client.close()
    np.testing.assert_allclose(got.ravel(), trained.expected[key](ROWS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key", [XGB, LGB, SKL])
def test_each_framework_answers_sagemaker_csv_as_its_library_predicts(s3_gateway: GatewayProcess,
                                                                       trained: Trained, key: str) -> None:
    csv = "\n".join(",".join(repr(float(v)) for v in row) for row in ROWS).encode()
    status, raw, headers = http("POST", f"{s3_gateway.url}/invocations", csv,
                                {"X-Amzn-SageMaker-Target-Model": key, "Content-Type": "text/csv"})
    assert status == 200, raw
    assert {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/csv")
    got = np.loadtxt(io.StringIO(raw.decode()), delimiter=",", ndmin=1)
    np.testing.assert_allclose(got, trained.expected[key](ROWS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key", [XGB, LGB])
def test_wrong_feature_count_is_a_client_error_and_the_model_keeps_answering(
        s3_gateway: GatewayProcess, trained: Trained, key: str) -> None:
    status, answer = _kserve_http(s3_gateway, key, ROWS[:, :FEATURES - 1])
    assert status == 400, answer
    status, answer = _kserve_http(s3_gateway, key, ROWS[:2])
    assert status == 200
    np.testing.assert_allclose(_only_output(answer).ravel(), trained.expected[key](ROWS[:2]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key", [XGB, LGB])
def test_concurrent_requests_batched_together_each_get_their_own_rows(
        s3_gateway: GatewayProcess, trained: Trained, key: str) -> None:
    """Dynamic batching hands the runner several requests at once; each answer must be its own rows'."""
    _kserve_http(s3_gateway, key, ROWS[:1])  # loaded before the burst
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        rows = np.roll(ROWS, i, axis=0)[: 1 + i % 5]
        status, answer = _kserve_http(s3_gateway, key, rows)
        assert status == 200
        results[i] = _only_output(answer).ravel() - trained.expected[key](rows)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 16
    assert max(float(np.abs(diff).max()) for diff in results.values()) < 1e-3


@pytest.mark.parametrize("key, framework", [(XGB, "xgboost"), (LGB, "lightgbm"), (SKL, "sklearn")])
def test_each_runner_is_measured_like_any_model(s3_gateway: GatewayProcess, trained: Trained, key: str,
                                                framework: str) -> None:
    """The budget holds for the new runners because their stubs are measured after the load."""
    assert _kserve_http(s3_gateway, key, ROWS[:1])[0] == 200
    loads = [e for e in s3_gateway.events("model.loaded") if e["model"] == key]
    assert loads, f"no model.loaded event for {key}"
    assert loads[-1]["framework"] == framework and loads[-1]["backend"] == "python"
    assert loads[-1]["footprint_source"] == "measured" and loads[-1]["footprint_bytes"] > 1 << 20
    ledger = json.loads((s3_gateway.cache_dir / "footprints.json").read_text())["footprints"]
    classes = {entry["class"]: entry["bytes"] for entry in ledger.values()}
    assert classes.get(f"python/{framework}/KIND_CPU", 0) > 1 << 20, classes  # kept for the next estimate


def test_a_pickle_is_refused_with_a_clear_422(s3_gateway: GatewayProcess, trained: Trained) -> None:
    status, raw, _ = http("POST", f"{s3_gateway.url}/v2/models/{PICKLED}/infer",
                          json.dumps({"inputs": [{"name": "input__0", "shape": [1, FEATURES], "datatype": "FP32",
                                                  "data": ROWS[0].tolist()}]}).encode())
    assert status == 422
    text = raw.decode()
    assert PICKLED in text and "pickle" in text and "--allow-pickle" in text
    assert "/" + PREFIX not in text and str(s3_gateway.cache_dir) not in text
    # asked again, still refused (not half-staged), and over SageMaker as a client-side model error
    status, raw, _ = http("POST", f"{s3_gateway.url}/invocations", b"1,2,3,4,5,6",
                          {"X-Amzn-SageMaker-Target-Model": PICKLED, "Content-Type": "text/csv"})
    assert 400 <= status < 500 and b"pickle" in raw


@pytest.fixture(scope="module")
def pickle_gateway(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose operator allows pickles, on a local store holding the pickled forest and the demo
    store's tree cities (as `make run` builds them)."""
    store = tmp_path_factory.mktemp("pickle-store")
    (store / "rf.tar.gz").write_bytes(tar_gz({"model.joblib": _joblib_bytes(trained.rf)}))
    build_store(store, tuple(TREE_CITIES))
    gw = GatewayProcess(["--store", str(store), "--allow-pickle"], tmp_path_factory.mktemp("pickle-gateway"))
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()


def _joblib_bytes(model: object) -> bytes:
    import joblib

    buf = io.BytesIO()
    joblib.dump(model, buf)
    return buf.getvalue()


def test_a_pickle_is_served_when_the_operator_allows_it(pickle_gateway: GatewayProcess, trained: Trained) -> None:
    status, answer = _kserve_http(pickle_gateway, "rf.tar.gz", ROWS)
    assert status == 200, answer
    np.testing.assert_allclose(_only_output(answer).ravel(), trained.rf.predict(ROWS), rtol=1e-5, atol=1e-4)
    staged = list((pickle_gateway.cache_dir / "repo").glob("*/1/*"))
    assert any(p.name == "model.onnx" for p in staged) and not any(p.suffix in (".joblib", ".pkl") for p in staged)



@pytest.mark.parametrize("city", sorted(TREE_CITIES))
def test_the_demo_stores_tree_cities_answer_house_prices(pickle_gateway: GatewayProcess, city: str) -> None:
    houses, prices = synthetic_houses(city, 50)
    rows = houses.astype(np.float32)
    status, answer = _kserve_http(pickle_gateway, f"{city}.tar.gz", rows)
    assert status == 200, answer
    got = _only_output(answer).ravel()
    ((name, data),) = tree_model_files(city, TREE_CITIES[city]).items()
    if name == "xgboost.json":
        booster = xgboost.Booster()
        booster.load_model(bytearray(data))
        expected = booster.predict(xgboost.DMatrix(rows))
    else:
        expected = lightgbm.Booster(model_str=data.decode()).predict(rows)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    assert np.corrcoef(got, prices)[0, 1] > 0.9  # a house-price model, not noise
