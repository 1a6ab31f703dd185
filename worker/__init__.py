"""The Sluice worker: Celery task, runner, engines, reconciler."""
