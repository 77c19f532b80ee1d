"""Session-wide process pools of 2 and 4 gloo ranks (see harness.py)."""

import pytest
from harness import ProcessPool


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
