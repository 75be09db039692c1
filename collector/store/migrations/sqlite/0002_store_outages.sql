-- certmon store schema 2, SQLite dialect (keep in step with postgres/0002_store_outages.sql).
-- Store outages a collector lived through, written when the store is back (docs/store.md):
-- what `certmon-collector report` prints as "last store outage".
CREATE TABLE store_outages (
    id             INTEGER PRIMARY KEY,
    collector      TEXT NOT NULL,        -- the MQTT client id of the collector that held on
    started_at     TEXT NOT NULL,
    ended_at       TEXT NOT NULL,
    messages_held  INTEGER NOT NULL,     -- the most messages it held unacknowledged
    error          TEXT NOT NULL         -- the error class, never a URL or password
);
