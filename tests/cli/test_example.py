"""The worked example in examples/ runs, end to end, and shows what it says."""

from __future__ import annotations

import subprocess
import sys

from tests.cli.test_cli import ROOT, Cli


def test_the_multi_agent_example_runs(cli: Cli) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multi_agent.py")],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "the support agent wrote 4 messages" in out
    assert "the reviewer may not write" in out and "read-only" in out
    assert "the reviewer's context within 60 tokens" in out
    assert "a late write from the ended workflow: refused (workflow_ended)" in out
    assert "memories of acme now: acme/customer-support/support-c-1001" in out
