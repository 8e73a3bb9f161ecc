"""A module-level Celery app, so Celery's own tools work on a sumfleet fleet unmodified:

    celery -A models.celery_app inspect ping            # every worker answers
    celery -A models.celery_app inspect ping -d sumfleet.smollm2@$HOSTNAME
    celery -A models.celery_app inspect active | stats
    celery -A models.celery_app events                  # with workers started with -E
    celery -A models.celery_app flower                  # pip install flower

It is the app `submit` publishes with, configured from the SUMFLEET_* environment (the broker
URL above all); it has no task of its own, which inspection and events do not need.
"""

from __future__ import annotations

from models.broker import create_app
from models.settings import load_settings

app = create_app(load_settings())
