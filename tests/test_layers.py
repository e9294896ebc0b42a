"""The dependency rule of docs/architecture.md, read from the imports of every module.

core <- storage <- kv;  core <- wire;  (core, kv.format, storage, wire) <- runtime
<- services <- launcher and bench. Nothing imports upward; the core does no I/O.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# which project packages each layer may import (besides itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "shared": (),
    "shared.core": (),
    "shared.storage": ("shared.core",),
    "shared.kv": ("shared.core", "shared.storage"),
    "shared.wire": ("shared.core",),
    "shared.runtime": ("shared.core", "shared.kv.format", "shared.storage", "shared.wire"),
    "services.launcher": ("shared", "services", "bench"),  # bench: `cake bench` only
    "services": ("shared",),
    "bench": ("shared", "services"),
}
PROJECT = ("shared", "services", "bench", "tests")
# third-party packages the pure core must never touch (no tensors, no network, no storage)
NOT_IN_CORE = ("torch", "transformers", "nats", "aioboto3", "aiobotocore", "botocore", "aiohttp")


def modules() -> Iterator[tuple[str, Path]]:
    """Every project module (tests aside) and its file."""
    for package in ("shared", "services", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def layer_of(module: str) -> str:
    """The most specific layer a module belongs to."""
    return max((layer for layer in ALLOWED if inside(module, layer)), key=len)


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def own_service(module: str) -> str:
    """services.<name> for a service module (a service imports no other service)."""
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: str(v))
def test_imports_follow_the_layers(module: str, path: Path) -> None:
    layer = layer_of(module)
    allowed = (layer, *ALLOWED[layer])
    if layer == "services":
        allowed = (own_service(module), "shared")
    for imported in imports(path):
        if not imported.startswith(PROJECT):
            continue
        assert any(inside(imported, a) for a in allowed), f"{module} imports {imported}"


@pytest.mark.parametrize("module,path", [m for m in modules() if inside(m[0], "shared.core")])
def test_the_core_is_pure(module: str, path: Path) -> None:
    for imported in imports(path):
        assert imported.split(".")[0] not in NOT_IN_CORE, f"{module} imports {imported}"


def test_only_the_cli_reaches_the_bench_and_only_when_asked() -> None:
    for module, path in modules():
        if inside(module, "services"):
            bench = [i for i in imports(path) if inside(i, "bench")]
            assert not bench or module == "services.launcher.cli", f"{module} imports {bench}"
    top_level = {
        n.module
        for n in ast.parse((ROOT / "services/launcher/cli.py").read_text()).body
        if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not any(inside(m, "bench") for m in top_level), "cli imports the bench at start"


@pytest.mark.parametrize(
    "module", ["services.loader.service", "services.merger.service", "shared.core.plan"]
)
def test_services_without_a_model_load_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
