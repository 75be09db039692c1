-- certmon store schema 1, PostgreSQL dialect (docs/store.md; keep in step with sqlite/0001_init.sql).
-- Instants are TIMESTAMPTZ; JSON stays TEXT (status_json must be the verified bytes'
-- text, not JSONB's normalised form). Tables go into the first schema of search_path.

CREATE TABLE devices (
    device_id          TEXT PRIMARY KEY,
    first_seen_at      TIMESTAMPTZ NOT NULL,
    last_received_at   TIMESTAMPTZ,
    last_status_ts     TIMESTAMPTZ,      -- device wall clock of the newest status
    boot_id            TEXT,             -- of the newest status
    seq                BIGINT,
    interval_s         INTEGER,
    online             BOOLEAN NOT NULL DEFAULT FALSE,
    online_changed_at  TIMESTAMPTZ,
    severity           SMALLINT NOT NULL DEFAULT 3 CHECK (severity BETWEEN 0 AND 3),
    worst_code         TEXT,
    findings_json      TEXT NOT NULL DEFAULT '[]',
    status_json        TEXT,
    client_sha256      TEXT,
    trust_digest       TEXT,
    clock_offset_lo_s  DOUBLE PRECISION,
    clock_offset_hi_s  DOUBLE PRECISION,
    clock_offset_at    TIMESTAMPTZ,
    updated_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX devices_severity ON devices (severity DESC, device_id);

-- When the fleet's collectors first saw each boot: the only order between random boot ids.
CREATE TABLE device_boots (
    device_id      TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    boot_id        TEXT NOT NULL,
    first_seen_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);

-- The replay guard: insert-if-absent is the atomic "is (boot_id, seq) new?".
CREATE TABLE status_seen (
    device_id    TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    boot_id      TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    device_ts    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
);
CREATE INDEX status_seen_received_at ON status_seen (received_at);

CREATE TABLE certificates (
    sha256               TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    subject              TEXT NOT NULL,
    issuer               TEXT,            -- NULL until known (an inventory names CAs only)
    serial_hex           TEXT,
    not_before           TIMESTAMPTZ NOT NULL,
    not_after            TIMESTAMPTZ NOT NULL,
    key_type             TEXT,
    key_bits             INTEGER,
    signature_algorithm  TEXT,
    is_ca                BOOLEAN,
    is_self_issued       BOOLEAN,
    first_seen_at        TIMESTAMPTZ NOT NULL,
    last_seen_at         TIMESTAMPTZ NOT NULL,
    der                  BYTEA
);
CREATE INDEX certificates_not_after ON certificates (not_after);

-- Key order (device, role, sha256): "replace this device's set for a role" is a prefix scan.
CREATE TABLE device_certs (
    device_id     TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    role          TEXT NOT NULL CHECK (role IN ('client', 'chain', 'trust', 'broker', 'signing')),
    sha256        TEXT NOT NULL REFERENCES certificates,
    since_at      TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (device_id, role, sha256)
);
CREATE INDEX device_certs_sha256 ON device_certs (sha256, role);

CREATE TABLE history (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    at           TIMESTAMPTZ NOT NULL,
    kind         TEXT NOT NULL,
    detail_json  TEXT NOT NULL
);
CREATE INDEX history_device ON history (device_id, id);

CREATE TABLE alerts (
    alert_key         TEXT PRIMARY KEY,  -- e.g. "rule|device|cert"
    rule              TEXT NOT NULL,
    device_id         TEXT,              -- no foreign key: fleet alerts have none
    cert_sha256       TEXT,
    severity          SMALLINT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('firing', 'resolved')),
    summary           TEXT NOT NULL,
    labels_json       TEXT NOT NULL DEFAULT '{}',
    started_at        TIMESTAMPTZ NOT NULL,
    resolved_at       TIMESTAMPTZ,
    last_notified_at  TIMESTAMPTZ,
    notify_count      INTEGER NOT NULL DEFAULT 0,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX alerts_state ON alerts (state, severity);
CREATE INDEX alerts_device ON alerts (device_id, updated_at);

CREATE TABLE rejections (
    reason   TEXT PRIMARY KEY,
    count    BIGINT NOT NULL,
    last_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE reject_samples (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    reason  TEXT NOT NULL,
    topic   TEXT NOT NULL,
    detail  TEXT NOT NULL,
    sample  BYTEA NOT NULL               -- the first 512 bytes of the payload
);
CREATE INDEX reject_samples_reason ON reject_samples (reason, id);

CREATE TABLE inventories (
    device_id   TEXT PRIMARY KEY REFERENCES devices ON DELETE CASCADE,
    digest      TEXT NOT NULL,
    cas_json    TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE scans (
    target       TEXT PRIMARY KEY,
    scanned_at   TIMESTAMPTZ NOT NULL,
    severity     SMALLINT NOT NULL,
    result_json  TEXT NOT NULL
);

-- Leader-less periodic jobs: a conditional upsert on claimed_at is "my turn".
CREATE TABLE job_claims (
    job         TEXT PRIMARY KEY,
    claimed_at  TIMESTAMPTZ NOT NULL
);
