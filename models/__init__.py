"""sumfleet's persistent data model: tables, states, settings and the session factory.

Shared by the producer and the workers. ("models" here means the data model; the
language model is "the model" or "the engine", and lives in `worker`.)
"""
