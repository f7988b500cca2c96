-- Daily partitions of token_metrics, created ahead of the data and dropped past the retention.
-- Partitions are named token_metrics_pYYYYMMDD and cover [day, day + 1) in UTC.

CREATE FUNCTION tokvel_partition_name(day date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'token_metrics_p' || to_char(day, 'YYYYMMDD')
$$;

-- Idempotent and safe to call concurrently: a transaction-scoped advisory lock serialises the
-- creators, and an existing partition is left as it is.
CREATE FUNCTION tokvel_ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := tokvel_partition_name(day);
    lower_bound timestamptz := (day::timestamp AT TIME ZONE 'UTC');
    upper_bound timestamptz := ((day + 1)::timestamp AT TIME ZONE 'UTC');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tokvel_partitions'));
    IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE public.%I PARTITION OF public.token_metrics FOR VALUES FROM (%L) TO (%L)',
        part, lower_bound, upper_bound
    );
    RETURN true;
END
$$;

-- Partitions for every day of [first_day, first_day + days); returns how many were created.
CREATE FUNCTION tokvel_ensure_partitions(first_day date, days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        IF tokvel_ensure_partition(first_day + i) THEN
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Drops the daily partitions that end on or before cutoff; returns their names.
CREATE FUNCTION tokvel_drop_partitions_before(cutoff date) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tokvel_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'token_metrics'
          AND c.relname ~ '^token_metrics_p[0-9]{8}$'
          AND to_date(substr(c.relname, 16), 'YYYYMMDD') < cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE public.%I', part.relname);
        RETURN NEXT part.relname;
    END LOOP;
END
$$;
