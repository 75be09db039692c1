-- certmon store schema 2, PostgreSQL dialect (keep in step with sqlite/0002_store_outages.sql).
-- Store outages a collector lived through, written when the store is back (docs/store.md):
-- what `certmon-collector report` prints as "last store outage".
CREATE TABLE store_outages (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collector      TEXT NOT NULL,        -- the MQTT client id of the collector that held on
    started_at     TIMESTAMPTZ NOT NULL,
    ended_at       TIMESTAMPTZ NOT NULL,
    messages_held  BIGINT NOT NULL,      -- the most messages it held unacknowledged
    error          TEXT NOT NULL         -- the error class, never a URL or password
);
