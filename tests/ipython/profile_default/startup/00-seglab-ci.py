# Loaded by every test kernel (conftest.py points IPYTHONDIR here): quiet, toy-profile defaults, and
# torch threads shared fairly between the pytest-xdist workers (each runs its own notebook kernel).
import os

os.environ.setdefault("SEGLAB_PROFILE", "toy")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
try:
    import torch
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
except ImportError:
    pass
