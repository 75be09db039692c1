"""The dependency rule of the layout, checked by walking every import:
certmon (the core) imports neither role; the agent never imports the collector and the
collector never imports the agent; only certmon/mqtt.py imports paho."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(package: str) -> dict[Path, set[str]]:
    out: dict[Path, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[path] = names
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}"
            for path, names in imports_of(package).items() for name in sorted(names)
            if name.split(".")[0] in forbidden]


def test_core_imports_neither_role() -> None:
    assert offenders("certmon", ("agent", "collector")) == []


def test_agent_and_collector_do_not_import_each_other() -> None:
    assert offenders("agent", ("collector",)) == []
    assert offenders("collector", ("agent",)) == []


def test_only_the_mqtt_module_imports_paho() -> None:
    paho = [line for pkg in ("certmon", "agent", "collector")
            for line in offenders(pkg, ("paho",))]
    assert paho == ["certmon/mqtt.py imports paho.mqtt.client",
                    "certmon/mqtt.py imports paho.mqtt.enums",
                    "certmon/mqtt.py imports paho.mqtt.packettypes",
                    "certmon/mqtt.py imports paho.mqtt.properties",
                    "certmon/mqtt.py imports paho.mqtt.reasoncodes"]
