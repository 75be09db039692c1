-- certmon store schema 1, SQLite dialect (docs/store.md; keep in step with postgres/0001_init.sql).
-- Instants are TEXT 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (UTC, fixed width, so text order is
-- time order and range scans on an index work). Booleans are 0/1. JSON is TEXT.
-- Tables holding large values (status_json, der) keep a rowid; small composite-key
-- tables are WITHOUT ROWID so the primary key is the table.

CREATE TABLE devices (
    device_id          TEXT PRIMARY KEY,
    first_seen_at      TEXT NOT NULL,
    last_received_at   TEXT,
    last_status_ts     TEXT,             -- device wall clock of the newest status
    boot_id            TEXT,             -- of the newest status
    seq                INTEGER,
    interval_s         INTEGER,
    online             INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    online_changed_at  TEXT,
    severity           INTEGER NOT NULL DEFAULT 3 CHECK (severity BETWEEN 0 AND 3),
    worst_code         TEXT,
    findings_json      TEXT NOT NULL DEFAULT '[]',
    status_json        TEXT,
    client_sha256      TEXT,
    trust_digest       TEXT,
    clock_offset_lo_s  REAL,
    clock_offset_hi_s  REAL,
    clock_offset_at    TEXT,
    updated_at         TEXT NOT NULL
);
CREATE INDEX devices_severity ON devices (severity DESC, device_id);

-- When this collector (fleet) first saw each boot: the only order between random boot ids.
CREATE TABLE device_boots (
    device_id      TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    boot_id        TEXT NOT NULL,
    first_seen_at  TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id)
) WITHOUT ROWID;

-- The replay guard: insert-if-absent is the atomic "is (boot_id, seq) new?".
CREATE TABLE status_seen (
    device_id    TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    boot_id      TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    received_at  TEXT NOT NULL,
    device_ts    TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
) WITHOUT ROWID;
CREATE INDEX status_seen_received_at ON status_seen (received_at);

CREATE TABLE certificates (
    sha256               TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    subject              TEXT NOT NULL,
    issuer               TEXT,            -- NULL until known (an inventory names CAs only)
    serial_hex           TEXT,
    not_before           TEXT NOT NULL,
    not_after            TEXT NOT NULL,
    key_type             TEXT,
    key_bits             INTEGER,
    signature_algorithm  TEXT,
    is_ca                INTEGER CHECK (is_ca IN (0, 1)),
    is_self_issued       INTEGER CHECK (is_self_issued IN (0, 1)),
    first_seen_at        TEXT NOT NULL,
    last_seen_at         TEXT NOT NULL,
    der                  BLOB
);
CREATE INDEX certificates_not_after ON certificates (not_after);

-- Key order (device, role, sha256): "replace this device's set for a role" is a prefix scan.
CREATE TABLE device_certs (
    device_id     TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    role          TEXT NOT NULL CHECK (role IN ('client', 'chain', 'trust', 'broker', 'signing')),
    sha256        TEXT NOT NULL REFERENCES certificates,
    since_at      TEXT NOT NULL,
    last_seen_at  TEXT NOT NULL,
    PRIMARY KEY (device_id, role, sha256)
) WITHOUT ROWID;
CREATE INDEX device_certs_sha256 ON device_certs (sha256, role);

CREATE TABLE history (
    id           INTEGER PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    at           TEXT NOT NULL,
    kind         TEXT NOT NULL,
    detail_json  TEXT NOT NULL
);
CREATE INDEX history_device ON history (device_id, id);

CREATE TABLE alerts (
    alert_key         TEXT PRIMARY KEY,  -- e.g. "rule|device|cert"
    rule              TEXT NOT NULL,
    device_id         TEXT,              -- no foreign key: fleet alerts have none
    cert_sha256       TEXT,
    severity          INTEGER NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('firing', 'resolved')),
    summary           TEXT NOT NULL,
    labels_json       TEXT NOT NULL DEFAULT '{}',
    started_at        TEXT NOT NULL,
    resolved_at       TEXT,
    last_notified_at  TEXT,
    notify_count      INTEGER NOT NULL DEFAULT 0,
    updated_at        TEXT NOT NULL
);
CREATE INDEX alerts_state ON alerts (state, severity);
CREATE INDEX alerts_device ON alerts (device_id, updated_at);

CREATE TABLE rejections (
    reason   TEXT PRIMARY KEY,
    count    INTEGER NOT NULL,
    last_at  TEXT NOT NULL
);

CREATE TABLE reject_samples (
    id      INTEGER PRIMARY KEY,
    at      TEXT NOT NULL,
    reason  TEXT NOT NULL,
    topic   TEXT NOT NULL,
    detail  TEXT NOT NULL,
    sample  BLOB NOT NULL                -- the first 512 bytes of the payload
);
CREATE INDEX reject_samples_reason ON reject_samples (reason, id);

CREATE TABLE inventories (
    device_id   TEXT PRIMARY KEY REFERENCES devices ON DELETE CASCADE,
    digest      TEXT NOT NULL,
    cas_json    TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE scans (
    target       TEXT PRIMARY KEY,
    scanned_at   TEXT NOT NULL,
    severity     INTEGER NOT NULL,
    result_json  TEXT NOT NULL
);

-- Leader-less periodic jobs: a conditional upsert on claimed_at is "my turn".
CREATE TABLE job_claims (
    job         TEXT PRIMARY KEY,
    claimed_at  TEXT NOT NULL
);
