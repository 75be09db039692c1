"""The broker link says when it cannot reach its broker: once at once, then every ten
minutes while it lasts, however often paho retries."""

from __future__ import annotations

import logging
import time

import pytest
from kit.broker import free_port

from certmon.mqtt import FAIL_LOG_EVERY_S, LinkSettings, MqttLink


def test_an_unreachable_broker_is_logged_once_then_every_ten_minutes(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here
    fake_now = [1000.0]
    link = MqttLink(LinkSettings(host="127.0.0.1", port=port, client_id="t", is_tls=False,
                                 reconnect_min_s=1, reconnect_max_s=1),
                    monotonic=lambda: fake_now[0])
    caplog.set_level(logging.WARNING, logger="certmon.mqtt")
    link.start()
    try:
        def warnings() -> int:
            return sum("cannot connect to broker 127.0.0.1" in r.getMessage()
                       for r in caplog.records)

        deadline = time.monotonic() + 10
        while warnings() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert warnings() == 1
        time.sleep(2.5)  # paho retries every second: more failures, no more lines
        assert warnings() == 1
        fake_now[0] += FAIL_LOG_EVERY_S
        deadline = time.monotonic() + 10
        while warnings() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert warnings() == 2
    finally:
        link.stop(timeout_s=1)
