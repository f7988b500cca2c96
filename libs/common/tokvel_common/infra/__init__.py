"""The private local stack behind ``tokvel infra``: Kafka (KRaft), PostgreSQL 15 and Redis 7.

Each service runs as a plain detached process on loopback, with its data under the run dir
(``<project>/.run``, or ``TOKVEL_RUN_DIR``), so no container engine is needed.
"""
