"""The floors the gateway's hop is judged against: the least a forwarder on the same stack can cost.

- `http`: uvicorn with a raw ASGI app that forwards every request through the gateway's own Triton HTTP
  client (`gateway.triton.http`): no guard, no lease, no checks, no renaming.
- `grpc`: a grpc.aio server whose generic handler forwards every unary call as bytes over one grpc.aio
  channel: no parsing at all.
- nginx (`nginx_config`): the native floor, a reverse proxy with keep-alive upstreams (`proxy_pass` for
  HTTP, `grpc_pass` for gRPC), one worker.

    python benchmarks/forwarders.py http|grpc PORT UPSTREAM_HOST:PORT TRITON_KEY_FILE

Each sends Triton's restricted-API secret (from TRITON_KEY_FILE), as the gateway does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.triton import auth  # noqa: E402

_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def nginx_config(work: Path, http_port: int, grpc_port: int, triton_http: str, triton_grpc: str, key: str) -> str:
    """One nginx worker proxying `http_port` to Triton's HTTP and `grpc_port` to its gRPC, both kept alive and
    carrying Triton's restricted-API secret `key`."""
    return f"""daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000000;  # HTTP/1.1 and HTTP/2 alike; nginx's default (1000) ends a load run with GOAWAY
    keepalive_timeout 600s;
    client_max_body_size 0;
    client_body_buffer_size 32m;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    proxy_buffers 64 256k;
    upstream triton_http {{ server {triton_http}; keepalive 64; keepalive_requests 100000000; }}
    upstream triton_grpc {{ server {triton_grpc}; keepalive 64; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{http_port};
        location / {{ proxy_pass http://triton_http; proxy_http_version 1.1; proxy_set_header Connection "";
                    proxy_set_header {auth.HEADER} {key}; }}
    }}
    server {{
        listen 127.0.0.1:{grpc_port} http2;
        location / {{ grpc_pass grpc://triton_grpc; grpc_set_header {auth.GRPC_METADATA} {key}; }}
    }}
}}
"""


def serve_http(port: int, upstream: str, key: str) -> None:
    import uvicorn

    from gateway.triton.http import TritonHttp

    client = TritonHttp(upstream, api_key=key)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await client.start()
                await send({"type": "lifespan.startup.complete"})
            await client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        parts = []
        while True:
            message = await receive()
            if message.get("body"):
                parts.append(message["body"])
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        answer = await client.request(scope["method"], scope["path"], parts if scope["method"] == "POST" else None,
                                      headers)
        raw = [(k.encode(), v.encode("latin-1")) for k, v in answer.headers.items()]
        raw.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        await send({"type": "http.response.body", "body": answer.body})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="on")


def serve_grpc(port: int, upstream: str, key: str) -> None:
    import grpc
    import grpc.aio
    import uvloop

    metadata = auth.metadata(key)

    class Forward(grpc.GenericRpcHandler):
        def __init__(self, channel: grpc.aio.Channel) -> None:
            self.channel = channel
            self.calls: dict[str, Any] = {}

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            call = self.calls.get(details.method)
            if call is None:
                call = self.calls[details.method] = self.channel.unary_unary(details.method)

            async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await call(request, timeout=60, metadata=metadata)
            return grpc.unary_unary_rpc_method_handler(forward)

    async def main() -> None:
        channel = grpc.aio.insecure_channel(upstream, options=_UNLIMITED)
        server = grpc.aio.server(options=_UNLIMITED)
        server.add_generic_rpc_handlers((Forward(channel),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(main())


if __name__ == "__main__":
    kind, port_text, upstream_address, key_file = sys.argv[1:5]
    (serve_http if kind == "http" else serve_grpc)(int(port_text), upstream_address, Path(key_file).read_text())
