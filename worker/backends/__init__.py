"""Backends: one loaded model each, behind the narrow protocol of `worker.backends.base`."""
