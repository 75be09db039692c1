"""certmon's test kit: the one home of the helpers tests and benchmarks build on.

Owns: generated PKI (`kit.pki`, with the named relying-party scenarios in
`kit.scenarios` and the SHA-1 re-signing in `kit.der`), simulated devices and what
they publish (`kit.fleet`), a synthetic fleet written into a store (`kit.seed`), real
Mosquitto brokers (`kit.broker`) running certmon's shipped broker configuration
(`kit.brokerconf`, from packaging/mosquitto/) and a paho client that watches them
(`kit.mqttprobe`).

Must not: define pytest fixtures (tests/conftest.py does, on top of the kit), import
`bench/` (benchmarks import the kit, never the other way round), or reach the wall
clock where a caller can pass `now`.

Tests import it as `kit.*` because pytest's `pythonpath = ["tests"]` puts tests/ on
sys.path; bench scripts put tests/ there themselves (see bench/README.md).
"""
