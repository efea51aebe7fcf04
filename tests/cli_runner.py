"""The `vlmbatch` command run in-process, as the end-to-end tests run it."""

from __future__ import annotations

from typer.testing import CliRunner

from vlmbatch.cli import app

runner = CliRunner()


def invoke(*args, expect: int = 0):
    """Run `vlmbatch ARGS...` (each argument as text); the result, once its exit code is `expect`."""
    result = runner.invoke(app, [*map(str, args)], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result
