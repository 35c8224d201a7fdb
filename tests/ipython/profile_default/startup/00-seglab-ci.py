# Loaded by every test kernel (conftest.py points IPYTHONDIR here): quiet, toy-profile defaults, and
# seglab's CPU thread policy (each pytest-xdist worker runs its own notebook kernel).
import os

os.environ.setdefault("SEGLAB_PROFILE", "toy")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
try:
    from seglab.config import set_threads
    set_threads()  # seglab's one thread policy (nbs/00_foundations/00_config.ipynb)
except ImportError:
    pass
