"""What the load generator sends and when: Zipf model popularity, arrival processes, invocation payloads.

Kept free of I/O (apart from reading the payload file) so the distributions can be unit-tested exactly.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mme_bench.config import BenchConfigError, PayloadConfig, WorkloadConfig

CSV_TYPES = ("text/csv", "application/csv")
JSON_TYPES = ("application/json",)


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k^alpha for k = 1..n; alpha 0 gives the uniform distribution."""
    if n <= 0:
        raise ValueError("zipf_weights: need at least one model")
    ranks = np.arange(1, n + 1, dtype=np.float64)
    weights = ranks ** (-alpha)
    return weights / weights.sum()


class ModelChooser:
    """Draws model keys with Zipf popularity; the first key is the most popular (rank 1)."""

    def __init__(self, keys: list[str], alpha: float, seed: int) -> None:
        self.keys = list(keys)
        self.weights = zipf_weights(len(keys), alpha)
        self._rng = np.random.default_rng(seed)

    def next(self) -> str:
        return self.keys[int(self._rng.choice(len(self.keys), p=self.weights))]

    def sample(self, n: int) -> list[str]:
        return [self.keys[i] for i in self._rng.choice(len(self.keys), size=n, p=self.weights)]


def interarrival_times(cfg: WorkloadConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """n gaps (seconds) between open-loop arrivals, mean 1/rate.

    Poisson: exponential gaps. Gamma(shape k, scale 1/(rate k)): same mean, coefficient of variation
    1/sqrt(k), which is how bursty traffic is usually modelled.
    """
    if cfg.arrival == "closed" or cfg.rate_per_s is None:
        raise ValueError("interarrival_times: only open-loop workloads have arrival times")
    mean = 1.0 / cfg.rate_per_s
    if cfg.arrival == "poisson":
        return rng.exponential(mean, size=n)
    return rng.gamma(cfg.gamma_shape, mean / cfg.gamma_shape, size=n)


def arrival_schedule(cfg: WorkloadConfig, duration_s: float | None, count: int | None, seed: int) -> np.ndarray:
    """Arrival instants (seconds from the start) up to `duration_s`, or exactly `count` of them."""
    rng = np.random.default_rng(seed)
    if count is not None:
        return np.cumsum(interarrival_times(cfg, count, rng))
    assert duration_s is not None and cfg.rate_per_s is not None
    times: list[float] = []
    t = 0.0
    while True:
        chunk = interarrival_times(cfg, max(16, int(cfg.rate_per_s * duration_s)), rng)
        for gap in chunk:
            t += float(gap)
            if t >= duration_s:
                return np.array(times)
            times.append(t)


# -- payloads --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One invocation example, with the bodies each route needs prepared once, up front."""

    index: int
    content_type: str
    body: bytes  # as given: what SageMaker's /invocations takes
    v2_body: bytes | None  # KServe v2 JSON for /v2/models/{m}/infer; None if it cannot be expressed

    @property
    def is_csv(self) -> bool:
        return self.content_type.split(";")[0].strip().lower() in CSV_TYPES


def csv_to_v2(body: str, input_name: str, datatype: str) -> bytes:
    """CSV rows of numbers as one KServe v2 input tensor of shape [rows, columns].

    This is what the gateway's `/invocations` CSV support does server-side; doing it here lets the
    benchmark run against gateways that only speak KServe v2.
    """
    rows = [r for r in csv.reader(io.StringIO(body.strip())) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError("empty CSV body")
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("CSV rows have different numbers of columns")
    cast = float if datatype.startswith("FP") else int
    try:
        data = [cast(c.strip()) for r in rows for c in r]
    except ValueError as exc:
        raise ValueError(f"CSV body has a non-numeric cell: {exc}") from None
    return json.dumps({"inputs": [{"name": input_name, "shape": [len(rows), width], "datatype": datatype,
                                   "data": data}]}).encode()


def _is_v2_request(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("inputs"), list)


def make_payload(index: int, example: dict[str, Any], cfg: PayloadConfig) -> Payload:
    """Check one {"Body", "ContentType"} example and prepare its bodies."""
    where = f"payloads[{index}]"
    if not isinstance(example, dict) or "Body" not in example:
        raise BenchConfigError(f"{where}: expected an object with 'Body' (and 'ContentType'), got {example!r}")
    content_type = str(example.get("ContentType", "text/csv"))
    raw = example["Body"]
    kind = content_type.split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        obj = json.loads(raw) if isinstance(raw, str) else raw
        if not _is_v2_request(obj):
            raise BenchConfigError(f"{where}: an application/json body must be a KServe v2 request with 'inputs'")
        body = json.dumps(obj).encode()
        return Payload(index, content_type, body, body)
    if not isinstance(raw, str):
        raise BenchConfigError(f"{where}: Body must be a string for ContentType {content_type!r}")
    if kind in CSV_TYPES:
        try:
            v2 = csv_to_v2(raw, cfg.v2_input_name, cfg.v2_datatype)
        except ValueError as exc:
            raise BenchConfigError(f"{where}: {exc}") from None
        return Payload(index, content_type, raw.encode(), v2)
    return Payload(index, content_type, raw.encode(), None)  # other types only go through /invocations


def load_payloads(cfg: PayloadConfig) -> list[Payload]:
    """The inline examples followed by the JSON-lines file's, each checked and prepared."""
    examples: list[dict[str, Any]] = list(cfg.examples)
    if cfg.file:
        path = Path(cfg.file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise BenchConfigError(f"payloads.file: cannot read {path}: {exc.strerror}") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except ValueError as exc:
                    raise BenchConfigError(f"payloads.file {path}:{n}: not JSON: {exc}") from None
    if not examples:
        raise BenchConfigError("payloads: no invocation examples found")
    return [make_payload(i, ex, cfg) for i, ex in enumerate(examples)]


class PayloadCycle:
    """Hands out payloads round-robin, so every example is used evenly whatever the model mix."""

    def __init__(self, payloads: list[Payload]) -> None:
        self._payloads = payloads
        self._i = 0

    def next(self) -> Payload:
        p = self._payloads[self._i % len(self._payloads)]
        self._i += 1
        return p

    def __iter__(self) -> Iterator[Payload]:
        while True:
            yield self.next()
