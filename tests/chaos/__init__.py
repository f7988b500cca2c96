"""The chaos suite: faults against the whole stack during a replay of recorded real data.

``make chaos`` (``python -m tests.chaos``, about 20 minutes) runs ``tokvel up`` (the supervisor
and its six services) on a private local stack (:mod:`tests.chaos.environment`), replays the
recorded 5-minute week one snapshot per 0.3 s under a steady REST load, and meanwhile:

1. kill -9 each of ingestor, velocity worker, writer, gateway, broadcaster (the supervisor
   restarts them), three rounds, the second while PostgreSQL is down;
2. freezes Redis (SIGSTOP) for 60 s; then stops it, wipes its data and starts it again, and
   times the cache's warming (the gateway's hit rate back to 90 % within 60 s);
3. restarts the Kafka broker twice (SIGTERM, then SIGKILL);
4. stops PostgreSQL for 5 minutes, then times the writer's catch-up;
5. makes the network to PostgreSQL, then to Redis, drop every packet (a blackholed proxy in
   front of each) and times every API call meanwhile.

Then it lets the replay finish and accounts for every sample (:mod:`tests.chaos.verify`). It
prints one table of figures and exits 1 when one misses its target. ``--steps`` picks steps
of the plan; ``--quick`` is the short version run by ``make test``
(``test_chaos_quick.py``): one writer kill -9 and a 15 s Redis freeze on 150 snapshots, with
the same accounting.
"""
