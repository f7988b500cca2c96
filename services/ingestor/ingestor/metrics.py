"""The ingestor's Prometheus metrics, in a registry of their own (tests run several ingestors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngestorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.polls = Counter(
            "ingestor_polls", "Listing polls by outcome (ok, failed, abandoned).", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.poll_failures = Counter(
            "ingestor_poll_failures", "Failed CMC requests and polls by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.polls_skipped = Counter(
            "ingestor_polls_skipped", "Scheduled polls skipped because a poll overran.", registry=r
        )
        self.poll_duration = Histogram(
            "ingestor_poll_duration_seconds", "Wall time of a listing poll.", registry=r
        )
        self.last_success = Gauge(
            "ingestor_last_successful_poll_timestamp_seconds",
            "Unix time of the last poll that completed.",
            registry=r,
        )
        self.cmc_requests = Counter(
            "ingestor_cmc_requests", "CMC requests by endpoint and outcome.",
            ["endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.credits = Counter(
            "ingestor_cmc_credits_used", "CMC credits spent (status.credit_count).", ["endpoint"],
            registry=r,
        )  # fmt: skip
        self.quotes_published = Counter(
            "ingestor_quotes_published", "Quotes delivered to cmc.quotes.raw.", registry=r
        )
        self.quotes_skipped = Counter(
            "ingestor_quotes_skipped",
            "Fetched quotes not published: already published, or older than what was.",
            ["reason"],
            registry=r,
        )
        self.quotes_invalid = Counter(
            "ingestor_quotes_invalid", "Listing entries that fit no model (sent to the DLQ).",
            registry=r,
        )  # fmt: skip
        self.delivery_failures = Counter(
            "ingestor_delivery_failures", "Kafka deliveries that failed and were re-sent.",
            registry=r,
        )  # fmt: skip
        self.undelivered = Counter(
            "ingestor_quotes_undelivered",
            "Fetched quotes still undelivered when a shutdown gave up on Kafka.",
            registry=r,
        )
        self.token_info_published = Counter(
            "ingestor_token_info_published", "Token metadata messages delivered.", registry=r
        )
        self.lease_held = Gauge(
            "ingestor_lease_held", "1 while this replica holds the polling lease.", registry=r
        )
        self.stopped = Gauge(
            "ingestor_polling_stopped",
            "1 once polling stopped for good (bad key or plan), by reason.",
            ["reason"],
            registry=r,
        )
        self.paused_until = Gauge(
            "ingestor_paused_until_timestamp_seconds",
            "Unix time until which polling waits for CMC's credits to reset (0 when not).",
            registry=r,
        )
        self.dedupe_state_errors = Counter(
            "ingestor_dedupe_state_errors", "Failed writes of the dedupe state to Redis.",
            registry=r,
        )  # fmt: skip
