"""What the API and the workers share, below both: settings (`config`), job statuses
(`status`), the wire protocol and every Redis key (`protocol`), the Celery app
(`celery_app`), the artifact store (`storage`), the job lease (`lease`) and what a job may
read (`sources`).

Imports point down only: `api` and `worker` import this package and `warp_core`, never each
other; this package imports `warp_core` and neither adapter.
"""
