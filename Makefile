# The two set-up commands are `make run` (the gateway with demo models) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PORT ?= 8080
DEMO ?= .demo
STAMP := $(VENV)/.installed

.PHONY: install run test unit perf-analyzer demo-store bench bench-cache bench-overhead bench-routing bench-soak clean

$(STAMP): pyproject.toml scripts/bootstrap.sh scripts/install-perf-analyzer.sh
	scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	touch $@

install: $(STAMP)

perf-analyzer: $(STAMP)
	scripts/install-perf-analyzer.sh "$(VENV)"

demo-store: $(STAMP)
	$(VENV)/bin/mme-gateway demo-store $(DEMO)/store

run: demo-store
	$(VENV)/bin/mme-gateway serve --store $(DEMO)/store --cache-dir $(DEMO)/cache --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/unit

# The short demo benchmark (~5 minutes): starts gateways per profile on the demo store, writes the report.
bench: demo-store
	$(VENV)/bin/mme-gateway bench benchmarks/bench-demo.yaml --out bench-results/

bench-cache: $(STAMP)
	$(VENV)/bin/python benchmarks/cache_policies.py

# About ten minutes: direct, nginx, a bare forwarder and the gateway, HTTP and gRPC, three interleaved passes each.
bench-overhead: $(STAMP)
	scripts/install-nginx.sh
	$(VENV)/bin/python benchmarks/overhead.py --out bench-results/overhead.json

# Three gateways behind routers (~4 minutes): LOR vs random under heavy-tailed latency, cold loads with and without affinity.
bench-routing: $(STAMP)
	$(VENV)/bin/python benchmarks/routing.py

# About ten minutes: a store of 10,000 models, failures on purpose; exits non-zero on any other failure.
bench-soak: $(STAMP)
	$(VENV)/bin/python benchmarks/soak.py --out bench-results/soak.json

clean:
	rm -rf $(DEMO) .mme-cache .pytest_cache
