"""Celery configuration of the Flower process: our queues, so the broker page lists each one's depth.

Flower lists the queues its workers report; until it has asked them (or with none running) it falls back
to the queues named here, so the model queues' backlog is on the broker page from the start.
"""

from kombu import Queue

from core.queue import MAINTENANCE_QUEUE, MODEL_QUEUES, WEBHOOK_QUEUE

task_default_queue = MAINTENANCE_QUEUE
task_queues = [Queue(name) for name in (*MODEL_QUEUES.values(), WEBHOOK_QUEUE, MAINTENANCE_QUEUE)]
