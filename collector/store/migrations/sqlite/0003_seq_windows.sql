-- certmon store schema 3, SQLite dialect (keep in step with postgres/0003_seq_windows.sql).
-- The replay guard becomes O(1) per device boot (docs/store.md, "Replay guard"):
-- each boot row keeps its highest seq and a bitmap of the REORDER_WINDOW seqs below
-- it (collector.store.plan), instead of one status_seen row per status for 30 days.
-- From status_seen, the highest seq of each boot is carried over exactly and the
-- window as NULL, "every seq below the highest was seen": a status older than the
-- newest stored of its boot that never arrived before the upgrade is then a replay.
ALTER TABLE device_boots ADD COLUMN high_seq INTEGER;   -- NULL: no seq known yet
ALTER TABLE device_boots ADD COLUMN seen_bits BLOB;     -- bit i: seq high_seq-1-i seen
UPDATE device_boots SET high_seq = (
    SELECT max(s.seq) FROM status_seen s
    WHERE s.device_id = device_boots.device_id AND s.boot_id = device_boots.boot_id);
DROP TABLE status_seen;
