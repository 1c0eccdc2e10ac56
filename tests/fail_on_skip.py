"""``--fail-on-skip``: a run that skipped anything fails (``make test-fast`` loads this with ``-p``).

``make test-fast`` deselects, by marker, the tests that need what its light environment lacks (torch, the SAM
CLI, the SDK venv, Python 3.12). Whatever it still selects must run: a skip there means a missing marker or
a missing package, and it would otherwise pass unnoticed. pytest's ``-ra`` short summary names each skip and why.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fail-on-skip", action="store_true", default=False,
                     help="exit non-zero when any test or module was skipped")


_KEY = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--fail-on-skip"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.config.stash[_KEY] = skipped
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    skipped = config.stash.get(_KEY, 0)
    if skipped:
        terminalreporter.write_line(f"--fail-on-skip: {skipped} skipped, so this run fails (a missing marker, or "
                                    "something the environment lacks: see the short test summary)", red=True, bold=True)
