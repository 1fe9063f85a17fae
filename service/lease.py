"""A job's lease: proof, renewed by a heartbeat, that one live worker is running it.

Celery can deliver the same job twice (a redelivery after a visibility timeout, a dispatch
retried after a lost reply). The lease makes the second delivery wait instead of running the
job beside the first; when a worker dies, its lease expires after `lease_s` and the
redelivered job takes over, resuming from its checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import redis

from service.protocol import job_key

# Renew our lease; take it back if it lapsed (a heartbeat late on a starved machine) and
# nobody else took it; 0 if another worker holds it now.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseHeld(RuntimeError):
    """Another live worker holds the job's lease."""


class Lease:
    def __init__(self, client: redis.Redis, job_id: str, ttl_s: float) -> None:
        self.client = client
        self.key = job_key(job_id, "lease")
        self.ttl_ms = int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self.lost = threading.Event()
        """Set once the lease lapsed and another worker took the job over: stop, quietly."""
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> Lease:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            raise LeaseHeld(f"{self.key} is held by another worker")
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            # The client retries; a long outage lets the lease lapse, as it should.
            with contextlib.suppress(redis.RedisError):
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    self.lost.set()
                    return

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self.client.eval(_RELEASE, 1, self.key, self.token)
