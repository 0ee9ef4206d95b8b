"""Prometheus metrics of one agent (its own registry, so several agents can live in one test process)."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        counter, gauge = functools.partial(Counter, registry=r), functools.partial(Gauge, registry=r)
        histogram = functools.partial(Histogram, registry=r, buckets=_LATENCY_BUCKETS)
        self.hits = counter("pacsgw_cache_hits", "Reads served from the SSD cache")
        self.misses = counter("pacsgw_cache_misses", "Reads that had to fetch from object storage")
        self.bytes_in = counter("pacsgw_bytes_received", "Bytes written by clients", ["protocol"])
        self.bytes_out = counter("pacsgw_bytes_sent", "Bytes read by clients", ["protocol"])
        self.uploaded_bytes = counter("pacsgw_uploaded_bytes", "Bytes uploaded to object storage")
        self.fetched_bytes = counter("pacsgw_fetched_bytes", "Bytes fetched from object storage")
        self.uploads = counter("pacsgw_uploads", "Upload attempts by result", ["result"])
        self.upload_seconds = histogram("pacsgw_upload_seconds", "Time to put one object")
        self.ack_seconds = histogram("pacsgw_close_to_ack_seconds", "From client close to success reply", ["protocol"])
        self.fetch_seconds = histogram("pacsgw_fetch_seconds", "Time to fetch one object")
        self.errors = counter("pacsgw_errors", "Errors returned to clients", ["protocol", "kind"])
        self.loop_crashes = counter("pacsgw_loop_crashes",
                                    "Background loops ended by an unexpected exception (each started again)", ["loop"])
        self.evictions = counter("pacsgw_evictions", "Cached copies dropped")
        self.evicted_bytes = counter("pacsgw_evicted_bytes", "Bytes of cached copies dropped")
        self.prefetched_files = counter("pacsgw_prefetched_files", "Files fetched ahead of any read")
        self.prefetched_bytes = counter("pacsgw_prefetched_bytes", "Bytes fetched ahead of any read")
        self.prefetch_used_files = counter("pacsgw_prefetch_used_files", "Prefetched files later read")
        self.prefetch_used_bytes = counter("pacsgw_prefetch_used_bytes", "Bytes of prefetched files later read")
        # since start, for the ratio (prometheus-client counters do not expose their value publicly)
        self._prefetched = self._prefetch_used = 0
        self.prefetch_hit_ratio = gauge("pacsgw_prefetch_hit_ratio",
                                        "Share of the files prefetched since start that were later read")
        self.prefetch_hit_ratio.set_function(lambda: self._prefetch_used / self._prefetched if self._prefetched else 0)
        self.prior_plans_over_cap = counter("pacsgw_prior_plans_over_cap",
                                            "New studies recorded but not planned: their writer was over "
                                            "[prefetch] priors_per_user_hour")
        self.queue_depth = gauge("pacsgw_upload_queue_files", "Files waiting for object storage")
        self.queue_bytes = gauge("pacsgw_upload_queue_bytes", "Bytes waiting for object storage")
        self.queue_oldest = gauge("pacsgw_upload_queue_oldest_seconds",
                                  "Age of the oldest file not yet in object storage (0: none)")
        self.cached_bytes = gauge("pacsgw_cache_bytes", "Bytes held in the SSD cache")
        self.pressure_level = gauge("pacsgw_pressure_level", "0 normal, 1 high, 2 critical")
        self.uplink_up = gauge("pacsgw_uplink_up", "1 when object storage answers")
        self.login_failures = counter("pacsgw_login_failures", "Failed logins", ["protocol"])
        self.login_refused = counter("pacsgw_login_refused", "Logins refused unchecked during a ban",
                                     ["protocol", "scope"])
        self.login_bans = counter("pacsgw_login_bans", "Temporary bans imposed", ["scope"])
        self.login_banned = gauge("pacsgw_login_banned", "Addresses and users banned now", ["scope"])

    def note_prefetched(self, size: int) -> None:
        self.prefetched_files.inc()
        self.prefetched_bytes.inc(size)
        self._prefetched += 1

    def note_prefetch_used(self, files: int, size: int) -> None:
        """Prefetched files read for the first time (counted when read statistics are flushed)."""
        self.prefetch_used_files.inc(files)
        self.prefetch_used_bytes.inc(size)
        self._prefetch_used += files

    def render(self) -> bytes:
        return generate_latest(self.registry)
