"""The broker chain as the agent's own MQTT session saw it, judged once per connection.

Owns the last `BrokerObservation` and the (connection, leaf) it was judged for, "has
the session's chain changed since" (a reconnect or a new broker leaf is reported at
once), and the completion of a leaf-only chain by a TLS probe of the same endpoint
(an ssl module without `get_unverified_chain`, public or private), kept only when
the probe saw the same leaf. Must not judge (`agent.status.observe_broker`) or hold
the link (`agent.uplink`): it is handed the current link.
"""

from __future__ import annotations

from datetime import datetime

from certmon import pki
from certmon.mqtt import MqttLink

from .certstore import DeviceMaterial
from .clocksync import ClockVerdict
from .config import AgentConfig
from .status import BrokerObservation, observe_broker


class BrokerChainWatch:
    def __init__(self) -> None:
        self.observation: BrokerObservation | None = None
        self._key: tuple[int, bytes] | None = None  # (connection, leaf DER) judged

    def forget_session(self) -> None:
        """A new link: its broker chain is judged afresh."""
        self._key = None

    def is_changed(self, link: MqttLink | None) -> bool:
        if link is None or not link.state.peer_chain_der:
            return False
        return (link.state.connects, link.state.peer_chain_der[0]) != self._key

    def refresh(self, link: MqttLink | None, config: AgentConfig, material: DeviceMaterial,
                now: datetime, policy: pki.Policy, clock: ClockVerdict) -> None:
        """Judge the chain the link's session saw, when it is one not judged yet."""
        if link is None or not link.state.peer_chain_der or not self.is_changed(link):
            return
        self._key = (link.state.connects, link.state.peer_chain_der[0])
        mqtt = config.mqtt
        presented = list(link.state.peer_chain_der)
        if len(presented) == 1:
            # Imported here: pyOpenSSL (~6 MiB resident) only in this case.
            from certmon.tlsprobe import ProbeTarget
            from certmon.tlsprobe import probe as tls_probe

            result = tls_probe(ProbeTarget(
                host=mqtt.host, port=mqtt.port, servername=mqtt.servername, alpn=mqtt.alpn,
                client_cert=str(config.tls.cert), client_key=str(config.tls.key),
                timeout_s=5.0))
            if result.presented_der and result.presented_der[0] == presented[0]:
                presented = list(result.presented_der)
        self.observation = observe_broker(mqtt.host, mqtt.port, link.state.tls_version,
                                          presented, material.trust_store, now, policy,
                                          clock=clock)
