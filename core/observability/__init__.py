"""Structured logs and Prometheus metrics shared by the gateway and the workers."""
