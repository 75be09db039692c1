"""The MQTT 3.1.1 fallback, against a broker that speaks only 3.1.1.

Mosquitto cannot be told to refuse MQTT v5, so this broker is a few lines of socket
code: it answers a v5 CONNECT the way a 3.1.1-only broker does (CONNACK "unacceptable
protocol version") and serves a 3.1.1 session well enough for the agent to deliver a
status: CONNACK, SUBACK, PUBACK, PINGRESP. Plain MQTT on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet
from kit.broker import wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import wire as p
from certmon.config import loads


class V311OnlyBroker:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.levels: list[int] = []  # the protocol level of every CONNECT
        self.published: list[str] = []  # topics of QoS 1 PUBLISHes
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _packet(self, conn: socket.socket) -> tuple[int, bytes] | None:
        head = conn.recv(1)
        if not head:
            return None
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return head[0], body

    def _serve(self, conn: socket.socket) -> None:
        try:
            while (packet := self._packet(conn)) is not None:
                kind, body = packet
                if kind >> 4 == 1:  # CONNECT: name length (2) + "MQTT" (4) + level
                    level = body[6]
                    self.levels.append(level)
                    if level != 4:
                        conn.sendall(b"\x20\x02\x00\x01")  # unacceptable protocol version
                        return
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind >> 4 == 8:  # SUBSCRIBE: packet id, then one granted QoS 0
                    conn.sendall(b"\x90\x03" + body[:2] + b"\x00")
                elif kind >> 4 == 3:  # PUBLISH
                    topic_len = int.from_bytes(body[:2], "big")
                    topic = body[2:2 + topic_len].decode()
                    if (kind >> 1) & 3 == 1:  # QoS 1: PUBACK with the packet id
                        conn.sendall(b"\x40\x02" + body[2 + topic_len:4 + topic_len])
                        self.published.append(topic)
                elif kind >> 4 == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind >> 4 == 14:  # DISCONNECT
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def v311_broker() -> Iterator[V311OnlyBroker]:
    broker = V311OnlyBroker()
    yield broker
    broker.close()


def test_agent_falls_back_to_mqtt_311_and_delivers(
    fleet_broker: Fleet, v311_broker: V311OnlyBroker, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-v311", tmp_path)
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtt://127.0.0.1:{v311_broker.port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / "state")})
    agent = AgentService(config, runner=lambda argv: None)
    try:
        agent.report_once()
        assert agent.wait_delivered(20), agent.link.state.last_error if agent.link else None
        assert v311_broker.levels[0] == 5 and v311_broker.levels[-1] == 4
        assert agent.link is not None and agent.link.settings.protocol == "v311"
        assert wait_until(lambda: p.status_topic(p.DEFAULT_PREFIX, "gw-v311")
                          in v311_broker.published, 5)
    finally:
        agent.shutdown()
