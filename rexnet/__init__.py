"""rexnet: run commands on the least-loaded machine of an ad-hoc cluster."""

__version__ = "0.1.0"
