"""Broker-host mode of the agent: a broker's own files, CRLs and served certificates.

One module per broker kind reads that broker's configuration into a
`model.BrokerConfig` (the inventory: endpoints and the files each references, with
FILE:LINE), registered in the literal `KINDS` below; `inventory` reads and judges the
files (certificates, keys, CRLs); `served` compares what a listener serves with its
certfile on disk; `render` is `check --broker-config`'s output, `statuspart` the
signed status's `broker_host` part and `watch` when `run` judges again. Must not
import the collector or the scanner.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import mosquitto
from .model import BrokerConfig

# One reader per broker kind (EMQX, VerneMQ later), never discovered by name.
KINDS: dict[str, Callable[[Path], BrokerConfig]] = {
    "mosquitto": mosquitto.read_config,
}

__all__ = ["KINDS", "BrokerConfig"]
