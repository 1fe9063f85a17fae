"""The Celery app: one long GPU job at a time, never lost.

The API sends jobs through it (`protocol.TASK`, by name, to the queue of the job's GPU
count); `worker.tasks` registers the task on it. Run a worker per machine or GPU set:
`WARP_WORKER_GPUS=N celery -A worker.tasks:app worker --concurrency 1`.
"""

from __future__ import annotations

from celery import Celery

from service.config import settings
from service.protocol import job_queue

app = Celery("warp", broker=settings.resolved_redis_url)
app.conf.update(
    # Ack only when a job has finished, and requeue it if the process running it dies:
    # a crashed or killed worker loses no job (the job resumes from its checkpoint).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A worker holds exactly the job it runs; the others stay in the queue for idle GPUs.
    worker_prefetch_multiplier=1,
    # Redis redelivers an unacked message after the visibility timeout; it must exceed the
    # longest job or a healthy long job would be started twice.
    broker_transport_options={"visibility_timeout": settings.job_time_limit_s + 3600},
    # Every job's task in a fresh child process, which runs the job as processes of its
    # own (worker.process): nothing of one job outlives it, and neither the worker nor its
    # children ever initialise CUDA.
    worker_max_tasks_per_child=1,
    # The soft limit raises in the task, which stops the job's processes and reports the
    # failure; the hard one kills the task process, and the job's processes die with it.
    task_soft_time_limit=settings.job_soft_time_limit_s,
    task_time_limit=settings.job_time_limit_s,
    # One queue per GPU count. A worker started with no -Q consumes this one, the queue of
    # jobs for its WARP_WORKER_GPUS, and a task it retries goes back to it; the API names
    # each job's queue when it sends it.
    task_default_queue=job_queue(settings.worker_gpus),
    task_serializer="json",
    accept_content=["json"],
    # Results live in PostgreSQL through the event stream, not in a result backend.
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    # A broker blip must not kill a days-long job: keep it running through the reconnect.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
)
