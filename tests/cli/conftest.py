"""The CLI tests' fixtures, for every module of the folder."""

from tests.cli.test_cli import cli, direct, service  # noqa: F401 (fixtures)
