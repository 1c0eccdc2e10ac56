"""The ``make test-fast`` plugin (loaded with ``-p tests.markers``): run without what some markers need.

``--without torch,sam,sdk,lambda312`` deselects every test carrying one of those markers (registered in
pyproject.toml), and does not even import a test module whose module-level ``pytestmark`` names one: such a
module may import what the environment lacks (torch) at its top. ``--fail-on-skip`` fails a run that skipped
anything: whatever is still selected must run, and a skip there (a missing marker, a missing package)
would otherwise pass unnoticed. pytest's ``-ra`` short summary names each skip and why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

_WITHOUT = pytest.StashKey[frozenset[str]]()
_NOT_IMPORTED = pytest.StashKey[set[str]]()
_SKIPPED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("markers", "selection by what a test needs (tests/markers.py)")
    group.addoption("--without", default="", metavar="MARKERS",
                    help="comma-separated markers: deselect the tests that carry one, without importing the "
                         "modules whose pytestmark names one")
    group.addoption("--fail-on-skip", action="store_true", default=False,
                    help="exit non-zero when any test or module was skipped")


def pytest_configure(config: pytest.Config) -> None:
    without = frozenset(filter(None, (m.strip() for m in config.getoption("--without").split(","))))
    registered = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    if unknown := sorted(without - registered):
        raise pytest.UsageError(f"--without: unregistered markers {unknown} (pyproject.toml lists them)")
    config.stash[_WITHOUT] = without
    config.stash[_NOT_IMPORTED] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    """pytest-xdist's controller collects nothing (its workers do): it lists what they will not import."""
    config = session.config
    without = config.stash.get(_WITHOUT, frozenset())
    if without and config.pluginmanager.hasplugin("dsession"):
        for arg in config.args:
            path = Path(arg.split("::", 1)[0])
            for module in sorted(path.rglob("test_*.py")) if path.is_dir() else [path]:
                if module.suffix == ".py" and module_marks(module) & without:
                    config.stash[_NOT_IMPORTED].add(module.name)


def module_marks(path: Path) -> set[str]:
    """The ``pytest.mark.<name>`` names in a module's top-level ``pytestmark``, read without importing it."""
    marks: set[str] = set()
    for node in ast.parse(path.read_bytes(), filename=str(path)).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            marks.update(sub.attr for sub in ast.walk(value)
                         if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute)
                         and sub.value.attr == "mark" and isinstance(sub.value.value, ast.Name)
                         and sub.value.value.id == "pytest")
    return marks


class NotImported(pytest.File):
    """A test module whose ``pytestmark`` names a ``--without`` marker: collected as empty, never imported."""

    def collect(self) -> list[pytest.Item]:
        self.config.stash[_NOT_IMPORTED].add(self.path.name)
        return []


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    without = parent.config.stash.get(_WITHOUT, frozenset())
    if without and module_marks(module_path) & without:
        return NotImported.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    without = config.stash.get(_WITHOUT, frozenset())
    if not without:
        return
    keep: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        (deselected if any(item.get_closest_marker(name) for name in without) else keep).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--fail-on-skip"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.config.stash[_SKIPPED] = skipped
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    without = config.stash.get(_WITHOUT, frozenset())
    if not_imported := config.stash.get(_NOT_IMPORTED, set()):
        terminalreporter.write_line(f"--without {','.join(sorted(without))}: not imported (module pytestmark): "
                                    f"{', '.join(sorted(not_imported))}")
    if skipped := config.stash.get(_SKIPPED, 0):
        terminalreporter.write_line(f"--fail-on-skip: {skipped} skipped, so this run fails (a missing marker, or "
                                    "something the environment lacks: see the short test summary)", red=True, bold=True)
