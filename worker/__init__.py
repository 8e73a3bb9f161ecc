"""The worker side: the Celery task, chunk processing, the sweeper, and the generation engines.

Importing this package does not import torch; only `worker.backends.hf` (loaded by
`worker.engine.load_engine` when a model needs it) does.
"""
