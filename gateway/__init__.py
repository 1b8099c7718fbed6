"""mme-gateway: serve many models from one Triton, loading each on first use."""

__version__ = "0.1.0"
