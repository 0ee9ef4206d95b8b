"""Prometheus metrics of one agent (its own registry, so several agents can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.hits = Counter("pacsgw_cache_hits", "Reads served from the SSD cache", registry=r)
        self.misses = Counter("pacsgw_cache_misses", "Reads that had to fetch from object storage", registry=r)
        self.bytes_in = Counter("pacsgw_bytes_received", "Bytes written by clients", ["protocol"], registry=r)
        self.bytes_out = Counter("pacsgw_bytes_sent", "Bytes read by clients", ["protocol"], registry=r)
        self.uploaded_bytes = Counter("pacsgw_uploaded_bytes", "Bytes uploaded to object storage", registry=r)
        self.fetched_bytes = Counter("pacsgw_fetched_bytes", "Bytes fetched from object storage", registry=r)
        self.uploads = Counter("pacsgw_uploads", "Upload attempts by result", ["result"], registry=r)
        self.upload_seconds = Histogram("pacsgw_upload_seconds", "Time to put one object", registry=r,
                                        buckets=_LATENCY_BUCKETS)
        self.ack_seconds = Histogram("pacsgw_close_to_ack_seconds", "From client close to success reply",
                                     ["protocol"], registry=r, buckets=_LATENCY_BUCKETS)
        self.fetch_seconds = Histogram("pacsgw_fetch_seconds", "Time to fetch one object", registry=r,
                                       buckets=_LATENCY_BUCKETS)
        self.errors = Counter("pacsgw_errors", "Errors returned to clients", ["protocol", "kind"], registry=r)
        self.evictions = Counter("pacsgw_evictions", "Cached copies dropped", registry=r)
        self.evicted_bytes = Counter("pacsgw_evicted_bytes", "Bytes of cached copies dropped", registry=r)
        self.prefetched_files = Counter("pacsgw_prefetched_files", "Files fetched ahead of any read", registry=r)
        self.prefetched_bytes = Counter("pacsgw_prefetched_bytes", "Bytes fetched ahead of any read", registry=r)
        self.prefetch_used_files = Counter("pacsgw_prefetch_used_files", "Prefetched files later read",
                                           registry=r)
        self.prefetch_used_bytes = Counter("pacsgw_prefetch_used_bytes", "Bytes of prefetched files later read",
                                           registry=r)
        # since start, for the ratio (prometheus-client counters do not expose their value publicly)
        self._prefetched = self._prefetch_used = 0
        self.prefetch_hit_ratio = Gauge("pacsgw_prefetch_hit_ratio",
                                        "Share of the files prefetched since start that were later read",
                                        registry=r)
        self.queue_depth = Gauge("pacsgw_upload_queue_files", "Files waiting for object storage", registry=r)
        self.queue_bytes = Gauge("pacsgw_upload_queue_bytes", "Bytes waiting for object storage", registry=r)
        self.queue_oldest = Gauge("pacsgw_upload_queue_oldest_seconds",
                                  "Age of the oldest file not yet in object storage (0: none)", registry=r)
        self.cached_bytes = Gauge("pacsgw_cache_bytes", "Bytes held in the SSD cache", registry=r)
        self.pressure_level = Gauge("pacsgw_pressure_level", "0 normal, 1 high, 2 critical", registry=r)
        self.uplink_up = Gauge("pacsgw_uplink_up", "1 when object storage answers", registry=r)
        self.login_failures = Counter("pacsgw_login_failures", "Failed logins", ["protocol"], registry=r)
        self.login_refused = Counter("pacsgw_login_refused", "Logins refused unchecked during a ban",
                                     ["protocol", "scope"], registry=r)
        self.login_bans = Counter("pacsgw_login_bans", "Temporary bans imposed", ["scope"], registry=r)
        self.login_banned = Gauge("pacsgw_login_banned", "Addresses and users banned now", ["scope"], registry=r)

    def note_prefetched(self, size: int) -> None:
        self.prefetched_files.inc()
        self.prefetched_bytes.inc(size)
        self._prefetched += 1
        self.prefetch_hit_ratio.set(self._prefetch_used / self._prefetched)

    def note_prefetch_used(self, files: int, size: int) -> None:
        """Prefetched files read for the first time (counted when read statistics are flushed)."""
        self.prefetch_used_files.inc(files)
        self.prefetch_used_bytes.inc(size)
        self._prefetch_used += files
        if self._prefetched:
            self.prefetch_hit_ratio.set(self._prefetch_used / self._prefetched)

    def render(self) -> bytes:
        return generate_latest(self.registry)
