"""The secret that Triton's restricted APIs require, which only the gateway sends.

Triton guards every API but health with `--http-restricted-api` and `--grpc-restricted-protocol`: a call
without the header `mme-triton-key: <secret>` is refused. The gateway's clients (control, HTTP and gRPC
data) send it on every call. The embedded Triton gets a new random secret at each gateway start; an
external Triton is started with the secret in `--triton-api-key-file`. It keeps out local clients that are
not the gateway (another container in the pod, a process on the host); it does not keep out model code,
which can read Triton's command line.
"""

from __future__ import annotations

import secrets
from pathlib import Path

HEADER = "mme-triton-key"  # the HTTP header; lower case, as gRPC metadata keys must be
GRPC_METADATA = "triton-grpc-protocol-" + HEADER  # Triton's gRPC server looks for the key under this prefix
# Every API Triton can restrict except health, which probes need without a secret.
RESTRICTED = ("metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace",
              "logging")


def new_key() -> str:
    """A fresh secret (URL-safe, so it fits a header and a command-line flag as it is)."""
    return secrets.token_urlsafe(32)


def read_key(path: Path) -> str:
    """The secret in `path` (surrounding whitespace dropped); ValueError if it is empty or unusable in a header."""
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty")
    if any(ch in ":,=" or ch.isspace() or not (ch.isascii() and ch.isprintable()) for ch in key):
        raise ValueError(f"{path} must hold one word of printable ASCII without ':', ',' or '='")
    return key


def triton_args(key: str) -> list[str]:
    """tritonserver's flags that restrict every API but health to calls carrying `key`."""
    apis = ",".join(RESTRICTED)
    return [f"--http-restricted-api={apis}:{HEADER}={key}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]


def metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata that carries `key` (None: nothing to send)."""
    return ((GRPC_METADATA, key),) if key else None
