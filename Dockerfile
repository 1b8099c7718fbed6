# The gateway's image: Python 3.11 on Debian 12 with the project installed, run as an unprivileged user. In
# compose.yaml it drives the NGC Triton container; run alone it starts the bundled CPU Triton (nvidia-pytriton)
# itself. It listens on all interfaces, so it needs API keys (MME_API_KEYS_FILE pointing at a mounted secret,
# or MME_API_KEYS) and refuses to start without them unless MME_INSECURE=1 says otherwise.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libpython3.11 make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mme-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY model_repo_templates ./model_repo_templates
COPY triton_backends ./triton_backends
# The server only: no extras, so neither the benchmark toolkit (mme_bench, the `bench` extra) nor its
# matplotlib, pyyaml and tqdm are in the image.
RUN pip install --no-cache-dir -e .
# Model code runs in Triton's Python stubs as this user, never as root; the cache volume and SageMaker's
# model directory belong to it. Not being root is also what lets the gateway keep its own /proc entries
# (environment, memory) from those stubs by making itself non-dumpable: a root process could read them anyway.
# The uid is fixed: deploy/kubernetes names it in runAsUser, and compose's secret files must be readable by it.
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mme \
    && mkdir -p /cache /opt/ml/models && chown mme:mme /cache /opt/ml/models
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["mme-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--store", "/opt/ml/models", "--cache-dir", "/cache"]
