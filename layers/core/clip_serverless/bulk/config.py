"""The bulk functions' environment, parsed once at init (a bad value fails the init, naming the variable).

    CLIP_BULK_SOURCE                  s3:// prefix jobs may read (the role's grant; unset: any, e.g. locally)
    CLIP_BULK_DESTINATION             s3:// prefix jobs may write
    CLIP_BULK_INVENTORY               s3:// prefix of S3 Inventory reports jobs may read (unset: none)
    CLIP_BULK_BATCH_SIZE              entries per shard when the job names none (1000)
    CLIP_BULK_MAX_CONCURRENCY         Map children at once when the job names none (10)
    CLIP_BULK_TOLERATED_FAILURE_PERCENT  failed shards (percent) the Map run tolerates (0)
    CLIP_BULK_PLAN_MARGIN_S           the planner checkpoints this many seconds before its timeout (60)

The prefixes repeat what the IAM policies grant, so that a job outside them fails at once with a message
saying so, rather than with an AccessDenied from the first object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..envparse import SettingsError, env_int, env_str
from .layout import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, JobError, JobSpec, S3Uri


@dataclass(frozen=True)
class BulkSettings:
    source: S3Uri | None = None
    destination: S3Uri | None = None
    inventory: S3Uri | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_concurrency: int = 10
    tolerated_failure_percent: int = 0
    plan_margin_s: int = 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BulkSettings:
        env = os.environ if environ is None else environ

        def uri(name: str) -> S3Uri | None:
            raw = env_str(name, None, env)
            if not raw:
                return None
            try:
                return S3Uri.parse(raw, name)
            except JobError as exc:
                raise SettingsError(str(exc)) from None

        settings = cls(
            source=uri("CLIP_BULK_SOURCE"), destination=uri("CLIP_BULK_DESTINATION"),
            inventory=uri("CLIP_BULK_INVENTORY"),
            batch_size=env_int("CLIP_BULK_BATCH_SIZE", DEFAULT_BATCH_SIZE, environ=env),
            max_concurrency=env_int("CLIP_BULK_MAX_CONCURRENCY", 10, environ=env),
            tolerated_failure_percent=env_int("CLIP_BULK_TOLERATED_FAILURE_PERCENT", 0, minimum=0, environ=env),
            plan_margin_s=env_int("CLIP_BULK_PLAN_MARGIN_S", 60, minimum=0, environ=env),
        )
        if settings.batch_size > MAX_BATCH_SIZE:
            raise SettingsError(f"CLIP_BULK_BATCH_SIZE must be at most {MAX_BATCH_SIZE}, got {settings.batch_size}")
        if settings.tolerated_failure_percent > 100:
            raise SettingsError("CLIP_BULK_TOLERATED_FAILURE_PERCENT must be 0..100, "
                                f"got {settings.tolerated_failure_percent}")
        return settings

    def check(self, spec: JobSpec) -> None:
        """JobError unless the job reads and writes only where this deployment may."""
        for allowed, uri, what in ((self.source, spec.src, "source"), (self.destination, spec.dst, "destination"),
                                   (self.inventory, spec.inventory, "inventory")):
            if uri is None:
                continue
            if allowed is None and what == "inventory" and (self.source or self.destination):
                raise JobError("this deployment reads no S3 Inventory (deploy with BulkInventoryBucket)")
            if allowed is not None and not allowed.contains(uri):
                raise JobError(f"{what} {uri} is outside {allowed}, which this deployment may "
                               f"{'write' if what == 'destination' else 'read'} (deploy with other Bulk* parameters)")
