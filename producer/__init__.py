"""The producer side: the Python API and the `sumfleet` command line.

from producer import Client, submit
"""

from producer.client import BatchStatus, Client, Submission, submit

__all__ = ["BatchStatus", "Client", "Submission", "submit"]
