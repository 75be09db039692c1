"""certmon: MQTT-native TLS certificate monitoring for IoT fleets.

The shared core: everything both the agent and the collector import lives here,
and this package imports neither of them.
"""

__version__ = "0.1.0"

# A date no later than this version's release. The clock plausibility rule uses it: a device
# wall clock earlier than this means the clock is certainly wrong (no RTC,
# fake-hwclock restored an old date), whatever else it says.
RELEASE_DATE = "2026-11-01"
