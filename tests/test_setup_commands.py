"""The README's two set-up commands: what CI runs is what a newcomer copies, in a venv."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start") : text.index("## Analysing slides")]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = re.findall(r"^TEST_COMMAND='(.+)'$", ci, flags=re.M)
    assert command in _readme_commands()


def test_both_setup_commands_work_in_a_project_virtual_environment():
    """PEP 668 systems refuse `pip install` outside a venv: both commands make (or reuse) one."""
    main_job, tests = _readme_commands()
    for command in (main_job, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        assert "python -m pip install -e " in command
    assert main_job.endswith("lungmets demo")
    assert tests.endswith("python -m pytest")
