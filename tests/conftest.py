import os

import pytest

# The test models are tiny: one thread each keeps OpenMP from spin-waiting against the other
# processes on a shared 2-core machine (a step can take 100x longer with 2 threads under
# load). Set before torch is imported; CLI subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: without it installed, never called
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (make test): one worker per core this process may use, counted as
    `processes = 0` counts them (affinity, hardware threads once, the container's CPU quota).
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides where it is set (None: xdist's own hook runs)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from tinygpt.distributed import physical_cores

    return physical_cores()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def served(monkeypatch):
    """The apps `tinygpt serve` would run (serving tests): uvicorn's loop is replaced by one that returns at once."""
    import uvicorn

    apps = []

    def run(self, sockets=None):
        apps.append(self.config.app)
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return apps


@pytest.fixture
def refused(capsys, monkeypatch):
    """Run `tinygpt ARGS` in this process; assert it fails with one line holding each fragment."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # main() sets it for train: restored afterwards

    from tinygpt.cli import main

    def check(args: list, *fragments: str) -> None:
        capsys.readouterr()
        assert main([str(a) for a in args]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
    return check
