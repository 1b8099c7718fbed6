"""Triton's gRPC API over one pooled `grpc.aio` channel: inference as serialized bytes, the rest typed.

ModelInfer and ModelStreamInfer are called without (de)serializers, bytes in and bytes out: the callers
edit the messages in their wire format (`gateway.grpc_wire`), so raw tensors (`raw_input_contents`,
`raw_output_contents`) are never parsed into protobuf or Python objects on their way through. The
model-resource and server calls use the typed stub. Every call carries the restricted APIs' secret as metadata.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2_grpc

from gateway.triton import auth

SERVICE = "inference.GRPCInferenceService"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class TritonRpcError(Exception):
    """Triton answered a gRPC call with an error status (details already in the client's terms)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class TritonGrpc:
    """The channel, the typed stub and the raw inference calls; created in the running loop by `start()`
    (grpc.aio channels bind to the loop that creates them)."""

    def __init__(self, grpc_url: str, api_key: str | None = None) -> None:
        self.grpc_url = grpc_url
        self._metadata = auth.metadata(api_key)
        self._channel: grpc.aio.Channel | None = None
        self.stub: Any = None  # service_pb2_grpc.GRPCInferenceServiceStub once started
        self._infer: grpc.aio.UnaryUnaryMultiCallable | None = None
        self._stream: grpc.aio.StreamStreamMultiCallable | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.grpc_url, options=UNLIMITED)
        self.stub = _KeyedStub(service_pb2_grpc.GRPCInferenceServiceStub(self._channel), self._metadata)
        self._infer = self._channel.unary_unary(f"/{SERVICE}/ModelInfer", _registered_method=True)
        self._stream = self._channel.stream_stream(f"/{SERVICE}/ModelStreamInfer", _registered_method=True)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def infer(self, request: bytes, timeout: float) -> bytes:
        """One serialized ModelInferRequest in, Triton's serialized ModelInferResponse out (the gateway's
        TargetModel already replaced by Triton's name; the caller puts it back in the answer)."""
        assert self._infer is not None, "TritonGrpc.start() not called"
        return await self._infer(request, timeout=timeout, metadata=self._metadata)

    def stream(self, timeout: float) -> Any:
        """A new ModelStreamInfer call: write serialized requests, iterate serialized responses."""
        assert self._stream is not None, "TritonGrpc.start() not called"
        return self._stream(timeout=timeout, metadata=self._metadata)


class _KeyedStub:
    """The typed stub with the secret's metadata bound to every method, so callers never pass it."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...] | None) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return method if self._metadata is None else functools.partial(method, metadata=self._metadata)
