"""The velocity processor: cmc.quotes.raw -> token.metrics, token.metrics.latest, cmc.quotes.dlq.

A Faust app (faust-streaming, aiokafka). ``tokvel run velocity`` (or ``python -m velocity``)
runs one worker; any number of workers share the partitions of ``cmc.quotes.raw``.

Modules
-------
``__main__``  parses VelocitySettings once, builds the app, runs a Faust worker (no Faust web)
              with the ops side server. ``app``  the composition root (``create_app``).
``topics``    topic names under TOPIC_PREFIX. ``tables``  the state table and its value format.
``agents``    the batch pipeline. ``rules``  pure domain rules (validation, one quote applied).
``publish``   records sent as aiokafka record batches, one per topic partition.
``metrics``   Prometheus metrics. ``web``  /healthz, /readyz, /metrics.
``settings``  VelocitySettings (every field is an environment variable, see ``--help``).

Validation (rules.validate)
---------------------------
Every message is decoded with the libs/common models. A message that fails goes to
``cmc.quotes.dlq`` (key: the input's key) as a ``DeadLetter`` with the input untouched (``raw``),
its topic/partition/offset and a machine-readable ``reason``; the stream never stops for one:

==================== =====================================================================
invalid_json         not JSON; also NaN, Infinity and numbers beyond the double range, which
                     JSON cannot carry (so every number that passes is finite)
not_an_object        JSON, but not an object
schema_violation     wrong types, missing required fields (``RawQuote``)
missing_value        a tombstone (null value)
key_mismatch         the Kafka key is not the entry's id: it decides the partition, hence the
                     worker holding the token's state, so it must be the id (as the ingestor
                     publishes it)
missing_usd_quote    no USD quote in the entry
missing_last_updated neither the USD quote nor the entry has ``last_updated``
negative_number      a negative price, volume, market cap or supply (percent changes may be
                     negative; a market cap of 0 is valid and not computable, see below)
future_timestamp     ``last_updated`` more than VELOCITY_FUTURE_SKEW_SECONDS (300) after the
                     listing time (``listed_at``, else ``polled_at``; never the wall clock)
too_late             more than 12 h (720 event minutes) behind the token's newest sample
processing_error     a bug raised while applying this one message (logged with its traceback)
==================== =====================================================================

Duplicates (same cmc_id and ``last_updated``, to the millisecond) are ignored: the first one
counts, later ones publish nothing (metric ``velocity_quotes_duplicate``).

The numbers (rules.apply, tokvel_common.velocity_math)
--------------------------------------------------------
Event time is ``last_updated``. The "now" that freshness is judged against is ``listed_at``
(the CMC answer's ``status.timestamp``), else ``polled_at``: a replay reproduces a live run.
Velocity, the 1h/4h/12h windows (minute buckets) and the 7d window (hour buckets), coverage,
trend, the robust-z-score outlier test and the quality score are velocity_math's, exactly by
ARCHITECTURE.md; its module docstring holds the detailed decisions. A quote with missing volume
or market cap, or a market cap of 0, is published with velocity 0.0 and a flag saying why,
and enters no window and no trend. ``points_expected`` uses VELOCITY_EXPECTED_INTERVAL_SECONDS
(60; 300 for the 5-minute recordings).

Output
------
Every accepted quote -> one ``MetricsSample`` on ``token.metrics`` (key cmc_id; ``ts`` = its
``last_updated``; ``schema_version``). ``token.metrics.latest`` (compacted) gets, per batch, the
newest sample of each token: a late sample (older than the token's newest) never goes there,
and of several samples of a token in one batch only the newest does (compaction would keep only
it anyway; during a catch-up this saves most of those records). JSON Schemas of the values are
checked in under ``libs/common/tokvel_common/schemas/`` (``make schemas``).

State
-----
Faust table ``token-state`` (changelog topic ``<app id>-token-state-changelog``, compacted),
co-partitioned with ``cmc.quotes.raw`` (both keyed by cmc_id, same partition count). One entry
per token: its ``TokenWindows`` (bounded whatever the poll rate: 11.6 KB at a 1-minute cadence)
and the (partition, offset) of the last input applied to it. VELOCITY_STORE selects
``memory://`` (state rebuilt from the changelog at start) or ``rocksdb://`` (RocksDB through
rocksdict under VELOCITY_DATA_DIR; a restart reads only the changelog's tail).

Recovery: at-least-once made exact (agents.py)
----------------------------------------------
A batch (``stream.noack_take`` joined by ``agents.coalesced``: closed when VELOCITY_BATCH_SIZE is
reached, after VELOCITY_BATCH_WITHIN_SECONDS, or once the input was quiet for
VELOCITY_BATCH_IDLE_SECONDS) is applied
message by message in offset order; a message whose (partition, offset) its token's state has
already applied is skipped (redelivered after a crash or a rebalance). Then, in one delivery
task, jobs in order: (1) every sample and dead letter of the batch is sent and its broker
acknowledgement (acks=all) awaited; (2) only then each changed token state is written, once per
token, and its changelog record's acknowledgement awaited; (3) only then are the batch's input
messages acked, which is what lets Faust commit their offsets (``noack_take`` acks nothing
itself: that ack is the only one); the next batch is applied while the previous one waits for
the broker (states not yet written are kept in an overlay read before the table).

What Faust guarantees, and what it does not: it commits only offsets of acked messages, and on
a rebalance or a stop it waits until every message it delivered is acked
(``stream_wait_empty``) before it commits and gives partitions away. It does call
``producer.flush()`` before committing, but that flush is not strict: its buffer's flush gives
up after 0.1 s without progress, and a record taken off the buffer but not yet handed to
aiokafka is in neither queue. So the state is not written with ``table[key] = value`` (whose
changelog record goes through that buffer, its delivery future dropped): ``StateTable.store``
writes the store and returns the changelog record, which the delivery task publishes itself
(in record batches, ``publish.py``) and whose acknowledgement it awaits before acking the input
(tables.py). Faust may also replay changelog entries
past the committed source offset; the (partition, offset) in each state makes that harmless.

Consequences, whatever the moment a worker dies (SIGKILL included): a state in the changelog
(or in RocksDB) implies that its samples are durable; input after the committed offset is
either already in the state (skipped) or applied again from the same state, which republishes
byte-identical samples. No window counts a sample twice or loses one. Downstream consumers
see at-least-once delivery of identical copies and dedupe on (cmc_id, ts) (the writer's
unique key); dead letters are at-least-once too (dedupe on topic, partition, offset; their
``rejected_at`` is the wall clock of each attempt). An agent that crashes takes the worker down
(``CrashingSupervisor``) rather than restarting in place on top of a dropped batch.

Scale: workers of one deployment form one consumer group (the app id ``tokvel-velocity``,
under TOPIC_PREFIX); partitions and their state move between them through the changelog (one
standby replica each, Faust's default). Producer linger VELOCITY_PRODUCER_LINGER_MS (5 ms).

Ops
---
``/healthz`` (liveness; answers during recovery), ``/readyz`` (state recovered, partitions
assigned, not rebalancing) and ``/metrics`` on VELOCITY_OPS_HOST:VELOCITY_OPS_PORT (8093):
``velocity_quotes_consumed``, ``velocity_samples_emitted``, ``velocity_quotes_rejected{reason}``,
``velocity_quotes_duplicate``, ``velocity_quotes_redelivered``, ``velocity_publish_retries``,
``velocity_batch_seconds``, ``velocity_consumer_lag_messages{partition}``,
``velocity_processing_lag_seconds``, ``velocity_state_tokens``, ``velocity_state_bytes``.
Logs: JSON (tokvel_common.logging); Faust's own logging setup is bypassed (it would set the
root logger's level), and nothing is logged per message.

Performance (``make bench-velocity``)
-------------------------------------
``bench/velocity_throughput.py``: quotes/s of one worker on a backlog of 100 000 recorded
quotes, beside a bare Faust agent iterating the same topic; ``bench/velocity_state_memory.py``:
state memory for 10 000 tokens. Measured numbers are in the README.
"""
