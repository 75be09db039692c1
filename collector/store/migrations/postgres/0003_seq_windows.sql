-- certmon store schema 3, PostgreSQL dialect (keep in step with sqlite/0003_seq_windows.sql).
-- The replay guard becomes O(1) per device boot (docs/store.md, "Replay guard"):
-- each boot row keeps its highest seq and a bitmap of the REORDER_WINDOW seqs below
-- it (collector.store.plan), instead of one status_seen row per status for 30 days.
-- From status_seen, the highest seq of each boot is carried over exactly and the
-- window as NULL, "every seq below the highest was seen": a status older than the
-- newest stored of its boot that never arrived before the upgrade is then a replay.
ALTER TABLE device_boots ADD COLUMN high_seq BIGINT;    -- NULL: no seq known yet
ALTER TABLE device_boots ADD COLUMN seen_bits BYTEA;    -- bit i: seq high_seq-1-i seen
UPDATE device_boots b SET high_seq = s.high FROM (
    SELECT device_id, boot_id, max(seq) AS high FROM status_seen GROUP BY device_id, boot_id
) s WHERE s.device_id = b.device_id AND s.boot_id = b.boot_id;
DROP TABLE status_seen;
