# The gateway's image: Python 3.11 on Debian 12 with the project installed. In compose.yaml it drives the
# NGC Triton container; run alone it starts the bundled CPU Triton (nvidia-pytriton) itself.
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
EXPOSE 8080 8081
ENTRYPOINT ["mme-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--store", "/opt/ml/models", "--cache-dir", "/cache"]
