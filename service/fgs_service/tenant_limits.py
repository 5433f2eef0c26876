"""Per-tenant caps on what one API process shares between tenants: open progress streams, gallery/compare
requests in progress, classifier check slots. Over its cap a tenant gets 429 with Retry-After; the cap is its
own, so what one tenant holds never refuses another.

Per process: each API replica counts its own (a tenant's streams spread over replicas by the load balancer).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fgs_common.settings import Settings
from fgs_service.errors import ApiError


class TenantSlots:
    """At most `cap` held at once per tenant (thread-safe: held from async handlers and threadpool threads)."""

    def __init__(self, cap: int, code: str, what: str, setting: str, retry_after_s: int):
        self.cap, self.code, self.what, self.setting, self.retry_after_s = cap, code, what, setting, retry_after_s
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        """Take one of the tenant's slots, or 429."""
        with self._lock:
            if self._held[tenant] >= self.cap:
                raise ApiError(
                    429,
                    self.code,
                    f"this API key already has {self.cap} {self.what} in progress ({self.setting}); retry in "
                    f"{self.retry_after_s} s",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self._held[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if self._held[tenant] <= 0:
                del self._held[tenant]

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def held(self, tenant: str) -> int:
        with self._lock:
            return self._held[tenant]


class CheckSlots:
    """Classifier check slots: FGS_CLASSIFIER_CHECKS_AT_ONCE in all, at most FGS_CLASSIFIER_CHECKS_PER_TENANT of
    them (running or waiting) per tenant. Within its share an upload waits for a slot, at most the time one check
    may take (FGS_CLASSIFIER_CHECK_TIMEOUT_S), so it is refused only by its own tenant's checks."""

    def __init__(self, settings: Settings):
        self._slots = threading.BoundedSemaphore(settings.classifier_checks_at_once)
        self._wait_s = settings.classifier_check_timeout_s
        self._tenants = TenantSlots(
            settings.classifier_checks_per_tenant,
            "classifier_checks_busy",
            "classifier checks",
            "FGS_CLASSIFIER_CHECKS_PER_TENANT",
            settings.classifier_check_retry_after_s,
        )
        self._retry_after_s = settings.classifier_check_retry_after_s

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """A slot for one check of `tenant`'s (blocking: called from the upload's threadpool thread)."""
        with self._tenants.hold(tenant):
            if not self._slots.acquire(timeout=self._wait_s):  # every slot held past its check's time limit
                raise ApiError(
                    429,
                    "classifier_checks_busy",
                    f"no classifier check slot came free within {self._wait_s:g} s; retry in {self._retry_after_s} s",
                    headers={"Retry-After": str(self._retry_after_s)},
                )
            try:
                yield
            finally:
                self._slots.release()
