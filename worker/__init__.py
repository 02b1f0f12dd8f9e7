"""Celery workers: the app, the batched model task, the sweeper and webhook delivery (see worker/app.py)."""
