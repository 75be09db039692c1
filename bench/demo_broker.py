"""The demo's broker host (bench/demo.py): a second Mosquitto with two of the broker-side
outages certmon finds (docs/broker-host.md), and the `[broker]` section of the agent
that runs on it; and the second broker endpoint the collector scans, whose
intermediate CA expires in 10 days (`start_expiring_endpoint`).

Owns starting those brokers and breaking them the way operators break theirs: its
certfile is renewed on disk after start and never reloaded (Mosquitto keeps serving
the old one, mosquitto#1877), and its crlfile's nextUpdate is 2 days away (after it,
Mosquitto refuses every client certificate). Must not start the agent or the
collector (bench/demo.py does). Real Mosquitto, real files; nothing simulated.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from kit.broker import BrokerStartError, Listener, Mosquitto
from kit.pki import Issued, PKIFactory, write_bundle, write_crls

EXPIRING_ENDPOINT_STORY = ("second broker endpoint: its intermediate CA expires in 10 days "
                           "(the collector's scan finds it; no device reports it)")

STORY = ("broker host: its certfile was renewed on disk but Mosquitto still serves the "
         "old one; its CRL's nextUpdate is 2 days away")


def start_judged_broker(work: Path, now: datetime,
                        devices_ca: Issued) -> tuple[Mosquitto, str]:
    """The broker host's own Mosquitto, already broken, and the agent's `[broker]`
    section naming its mosquitto.conf. Its clients are the fleet's devices
    (`devices_ca`, which also signs the CRL)."""
    work.mkdir(parents=True, exist_ok=True)
    pki = PKIFactory(now)
    broker_root = pki.root("demo Site Broker Root")
    # 20 days left on the one it serves; the renewed one has 90.
    old = pki.leaf(broker_root, "site-broker", usage="server", days=80, name="site-old",
                   sans=("localhost", "127.0.0.1"), not_before=now - timedelta(days=60))
    new = pki.leaf(broker_root, "site-broker", usage="server", days=90, name="site-new",
                   sans=("localhost", "127.0.0.1"))
    cert, key = work / "site-broker.crt", work / "site-broker.key"
    cert.write_bytes(old.cert_pem())
    key.write_bytes(old.key_pem())
    os.chmod(key, 0o600)
    cafile = write_bundle(work / "site-devices-ca.pem", [devices_ca])
    crlfile = write_crls(work / "site-devices.crl", [pki.crl(
        devices_ca, this_update=now - timedelta(days=5), next_update=now + timedelta(days=2))])
    broker = Mosquitto(work / "mosquitto", [Listener(
        tls=True, certfile=cert, keyfile=key, cafile=cafile, require_certificate=True,
        extra=f"crlfile {crlfile}")])
    try:
        broker.start()
    except BrokerStartError as exc:
        raise SystemExit(f"certmon demo: the broker host's mosquitto did not start:\n{exc}"
                         ) from None
    # certbot's deploy step without the restart: new files, the same process.
    cert.write_bytes(new.cert_pem())
    key.write_bytes(new.key_pem())
    section = f"""
[broker]
config = "{broker.conf_path}"
check_every_s = 10
"""
    return broker, section


def start_expiring_endpoint(work: Path, now: datetime, broker_root: Issued) -> Mosquitto:
    """A broker endpoint serving a chain whose intermediate (under `broker_root`, the CA
    the collector's `tls.ca_bundle` trusts) expires 10 days from `now`, long before its
    own certificate: what the collector's scheduled scan must flag."""
    work.mkdir(parents=True, exist_ok=True)
    pki = PKIFactory(now)
    intermediate = pki.intermediate(broker_root, "demo Broker Intermediate 2021", days=1835,
                                    not_before=now - timedelta(days=1825))  # 10 days left
    leaf = pki.leaf(intermediate, "broker-eu", usage="server", days=200,
                    sans=("localhost", "127.0.0.1"), not_before=now - timedelta(days=30))
    cert, key = leaf.write(work, chain=True)
    broker = Mosquitto(work / "mosquitto", [Listener(tls=True, certfile=cert, keyfile=key)])
    try:
        return broker.start()
    except BrokerStartError as exc:
        raise SystemExit(f"certmon demo: the second broker endpoint did not start:\n{exc}"
                         ) from None
