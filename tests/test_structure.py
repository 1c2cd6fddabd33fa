"""The package's shape: data flows one way, every error has one root, the CLI stays light.

The import graph is read from the source with `ast`, not from what happens to be
loaded, so a back-edge anywhere in a module (even in a function body) is found.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import vnetbackend
from vnetbackend.errors import VnetError

PACKAGE_DIR = Path(vnetbackend.__file__).parent

#: Stage -> the stages it must never import: nothing earlier in the flow reaches forward
#: (follower/snapshot -> RssConfig -> program -> reports -> checker), and nothing that
#: runs in production reaches into the test bed, the benchmarks or the demo.
FORBIDDEN = {
    "vnetbackend.rss": ("vnetbackend.qemu", "vnetbackend.steering", "vnetbackend.mirror",
                        "vnetbackend.checker", "vnetbackend.daemon", "vnetbackend.testbed",
                        "vnetbackend.bench", "vnetbackend.tap", "vnetbackend.demo"),
    "vnetbackend.qemu": ("vnetbackend.steering", "vnetbackend.mirror", "vnetbackend.checker",
                         "vnetbackend.daemon", "vnetbackend.testbed", "vnetbackend.bench",
                         "vnetbackend.demo"),
    "vnetbackend.steering": ("vnetbackend.qemu", "vnetbackend.mirror", "vnetbackend.checker",
                             "vnetbackend.daemon", "vnetbackend.testbed",
                             "vnetbackend.bench", "vnetbackend.demo"),
    "vnetbackend.queue_account": ("vnetbackend.steering", "vnetbackend.mirror",
                                  "vnetbackend.checker", "vnetbackend.kernel_check",
                                  "vnetbackend.daemon", "vnetbackend.testbed",
                                  "vnetbackend.bench", "vnetbackend.demo"),
    "vnetbackend.mirror": ("vnetbackend.checker", "vnetbackend.daemon",
                           "vnetbackend.testbed", "vnetbackend.bench", "vnetbackend.demo"),
    "vnetbackend.checker": ("vnetbackend.mirror", "vnetbackend.daemon",
                            "vnetbackend.testbed", "vnetbackend.bench", "vnetbackend.demo"),
    "vnetbackend.kernel_check": ("vnetbackend.qemu", "vnetbackend.mirror",
                                 "vnetbackend.checker", "vnetbackend.daemon",
                                 "vnetbackend.testbed", "vnetbackend.bench",
                                 "vnetbackend.demo"),
    "vnetbackend.daemon": ("vnetbackend.testbed", "vnetbackend.bench", "vnetbackend.demo"),
    "vnetbackend.guest_records": ("vnetbackend.steering", "vnetbackend.checker",
                                  "vnetbackend.mirror", "vnetbackend.daemon",
                                  "vnetbackend.testbed", "vnetbackend.bench",
                                  "vnetbackend.demo"),
    "vnetbackend.flowjoin": ("vnetbackend.mirror", "vnetbackend.daemon", "vnetbackend.testbed",
                             "vnetbackend.bench", "vnetbackend.demo"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every vnetbackend module *path* imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("vnetbackend")}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_data_flows_one_way() -> None:
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(sources) > 30
    back_edges = []
    for path in sources:
        module = _module_name(path)
        for stage, forbidden in FORBIDDEN.items():
            if _within(module, stage):
                back_edges += [f"{module} imports {name}" for name in sorted(_imports(path))
                               if any(_within(name, f) for f in forbidden)]
    assert not back_edges, "\n".join(back_edges)


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], "vnetbackend.")]


def test_every_error_the_package_defines_has_one_root() -> None:
    errors = []
    for name in _all_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == name and issubclass(cls, BaseException)
                    and not issubclass(cls, Warning)):
                errors.append(cls)
    assert len(errors) >= 15
    assert [c.__qualname__ for c in errors if not issubclass(c, VnetError)] == []


def test_the_daemon_commands_load_no_test_bed_or_benchmark() -> None:
    """Building the parser for ``run`` must not import the test bed (through a bench)."""
    probe = ("import sys, vnetbackend.cli as cli; cli.build_parser(['run', '--tap', 't']); "
             "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                            text=True).stdout.split()
    assert "vnetbackend.daemon.launch" in loaded
    assert [m for m in loaded if _within(m, "vnetbackend.testbed")
            or (_within(m, "vnetbackend.bench") and m != "vnetbackend.bench")] == []
