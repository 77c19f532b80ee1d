"""Session-wide process pools of 1, 2 and 4 gloo ranks (see harness.py), and a clean world per test."""

import pytest
from harness import ProcessPool


@pytest.fixture(scope="session")
def pool1():
    pool = ProcessPool(1)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool2():
    pool = ProcessPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    pool = ProcessPool(4)
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def _no_world_left_behind():
    """Every test leaves no process group and no exported MASTER_PORT behind: DSV3Strategy run in the
    test process keeps a gloo store listening on the port Lightning exported, and a later test that
    launches a script would inherit that port and fail to bind it (EADDRINUSE)."""
    from fault_checks import own_process_group

    with own_process_group():
        yield
