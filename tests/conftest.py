import os

import pytest

pytest_plugins = ["tests.slurm_cluster"]

# Tests run offline on CPU, with as many torch threads as the machine has cores to spare.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items):
    """Under `pytest -n N --dist loadgroup` (pytest-xdist), one worker runs all of a module's tests, so that a
    module's fixtures (a whole pipeline run) run once, and one worker runs every module that uses the Slurm
    test cluster: there is one /etc/slurm/slurm.conf per machine, so one cluster. A wrapper, so that the
    groups are marked before xdist's own hook reads them."""
    slurm_modules = {item.module.__name__ for item in items if "slurm_cluster" in item.fixturenames}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("slurm" if module in slurm_modules else module))
    return (yield)
