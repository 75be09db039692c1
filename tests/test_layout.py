"""The dependency rule of the layout, checked by walking every import:
certmon (the core) imports no role; the roles (agent, collector, scanner) never import
each other, so what two of them share lives in the core; only certmon/mqtt.py imports
paho."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("agent", "collector", "scanner")


def imports_of(package: str, root: Path = ROOT) -> dict[Path, set[str]]:
    out: dict[Path, set[str]] = {}
    paths = sorted((root / package).rglob("*.py"))
    assert paths, f"no package {package}/: the rule would pass vacuously"
    for path in paths:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[path] = names
    return out


def offenders(package: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)} imports {name}"
            for path, names in imports_of(package, root).items() for name in sorted(names)
            if name.split(".")[0] in forbidden]


def test_core_imports_no_role() -> None:
    assert offenders("certmon", ROLES) == []


def test_roles_do_not_import_each_other() -> None:
    for role in ROLES:
        assert offenders(role, tuple(r for r in ROLES if r != role)) == [], role


def test_the_rule_sees_a_role_importing_another(tmp_path: Path) -> None:
    # Deferred imports inside functions count as much as the module's own.
    (tmp_path / "scanner" / "sub").mkdir(parents=True)
    (tmp_path / "scanner" / "sub" / "x.py").write_text(
        "from . import y\n\ndef f():\n    from collector.store import open_store\n"
        "    import agent.cli\n")
    assert offenders("scanner", ("agent", "collector"), tmp_path) == [
        "scanner/sub/x.py imports agent.cli", "scanner/sub/x.py imports collector.store"]


def test_every_role_package_is_installed_and_typed() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["setuptools"]["packages"]["find"]["include"]) == {
        "certmon*", *(f"{r}*" for r in ROLES)}
    for package in ("certmon", *ROLES):
        assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"][package]
        assert (ROOT / package / "py.typed").is_file()
    assert set(pyproject["tool"]["mypy"]["files"]) == {"certmon", *ROLES}


def test_only_the_mqtt_module_imports_paho() -> None:
    paho = [line for pkg in ("certmon", *ROLES)
            for line in offenders(pkg, ("paho",))]
    assert paho == ["certmon/mqtt.py imports paho.mqtt.client",
                    "certmon/mqtt.py imports paho.mqtt.enums",
                    "certmon/mqtt.py imports paho.mqtt.packettypes",
                    "certmon/mqtt.py imports paho.mqtt.properties",
                    "certmon/mqtt.py imports paho.mqtt.reasoncodes"]
