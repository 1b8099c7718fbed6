"""`mme-gateway`: serve, and build demo artifacts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gateway import logs
from gateway.isolation import make_undumpable
from gateway.config import add_serve_arguments, settings_from_args
from gateway.router.settings import add_router_arguments

log = logging.getLogger("gateway.cli")


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import run

    settings = settings_from_args(args)
    logs.configure(settings.log_level)
    make_undumpable()  # before any secret is used: model code running as this user cannot read them here
    return run(settings)


def _router(args: argparse.Namespace) -> int:
    from gateway.router.server import run
    from gateway.router.settings import router_settings_from_args

    settings = router_settings_from_args(args)
    logs.configure(settings.log_level)
    make_undumpable()  # its upstream API key: unreadable to other processes of this user
    return run(settings)


def _demo_store(args: argparse.Namespace) -> int:
    from gateway.demo import DEMO_CITIES, build_store

    cities = tuple(args.cities) if args.cities else DEMO_CITIES
    for path in build_store(Path(args.dir), cities):
        print(path)
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from gateway.demo import write_artifact

    print(write_artifact(args.city, Path(args.out)))
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    """Print a new key once; only its hash is kept (appended to --file when given)."""
    from gateway.keys import key_line, new_key, parse_scopes

    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        print(f"mme-gateway keys create: {exc}", file=sys.stderr)
        return 2
    if not args.name or any(ch.isspace() or ch in "#;" for ch in args.name):
        print("mme-gateway keys create: --name must be one word (no spaces, '#' or ';')", file=sys.stderr)
        return 2
    key = new_key()
    line = key_line(args.name, scopes, key)
    if args.file:
        path = Path(args.file)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(line + "\n")
        print(f"# added to {path}: {line}", file=sys.stderr)
    else:
        print(f"# add this line to --api-keys-file (or MME_API_KEYS): {line}", file=sys.stderr)
    print(key)
    return 0


BENCH_EXTRA_MODULES = {"mme_bench", "matplotlib", "yaml", "tqdm"}
"""What `pip install mme-gateway[bench]` brings; the server itself never imports them."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="benchmark config (YAML or JSON), e.g. benchmarks/bench-demo.yaml")
    parser.add_argument("--out", default="bench-results", help="results directory (default: bench-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")


def _bench(args: argparse.Namespace) -> int:
    try:
        from mme_bench.cli import run
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in BENCH_EXTRA_MODULES:
            raise
        print(f"mme-gateway bench: {missing} is missing: install the bench extra, pip install 'mme-gateway[bench]' "
              "(in a checkout: .venv/bin/pip install -e '.[bench]')", file=sys.stderr)
        return 1
    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mme-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (starts an embedded Triton unless --triton-*-url)")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    router = sub.add_parser("router", help="route requests across gateway instances by model affinity")
    add_router_arguments(router)
    router.set_defaults(func=_router)
    store = sub.add_parser("demo-store", help="write the per-city house-price demo models into a directory")
    store.add_argument("dir")
    store.add_argument("--cities", nargs="*", help="city names such as Chicago_IL (default: the demo set)")
    store.set_defaults(func=_demo_store)
    model = sub.add_parser("demo-model", help="write one city's demo model artifact (e.g. NewYork_NY)")
    model.add_argument("city")
    model.add_argument("out", help="destination .tar.gz")
    model.set_defaults(func=_demo_model)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="make a key: prints the key once (stdout) and the line granting it, "
                                            "which holds only its hash")
    create.add_argument("--name", required=True, help="a name for logs, e.g. the client's")
    create.add_argument("--scopes", default="invoke", help="invoke, manage or invoke,manage (default: invoke)")
    create.add_argument("--file", help="append the granting line to this keys file (created 0600)")
    create.set_defaults(func=_keys_create)
    bench = sub.add_parser("bench", help="benchmark gateways from a config file: latency, cache, cost report")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
