"""The worker side: the Celery app and task, chunk processing, and the generation engines.

Importing this package does not import torch; only `worker.engines.transformers` does.
"""
