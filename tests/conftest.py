import os

pytest_plugins = ["tests.slurm_cluster"]

# Tests run offline on CPU, with as many torch threads as the machine has cores to spare.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
