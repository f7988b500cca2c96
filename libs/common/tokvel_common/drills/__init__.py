"""Recovery drills against the local stack: each breaks PostgreSQL for real and prints figures.

``python -m tokvel_common.drills.backup`` (``make backup-drill``) and
``python -m tokvel_common.drills.failover`` (``make failover-drill``). Both run on the stack of
``TOKVEL_RUN_DIR`` / ``TOKVEL_PORT_OFFSET`` (the default stack when unset: they kill its
PostgreSQL, so prefer a private one) and exit non-zero when a figure misses its target.
"""
