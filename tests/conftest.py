import pytest

from clirun import SMOKE, cli


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``cli.py fit --config configs/smoke.yaml`` once per test session: (working dir, output)."""
    cwd = tmp_path_factory.mktemp("smoke")
    out = cli(cwd, "fit", "--config", SMOKE)
    return cwd, out
