# Loaded by every test kernel (conftest.py points IPYTHONDIR here): quiet, toy-profile defaults, and
# seglab's CPU thread policy (each pytest-xdist worker runs its own notebook kernel).
# Nothing is left in the notebook's namespace: a name defined here would hide a notebook that uses it before
# defining or importing it (a student's fresh kernel has no such start-up file).
def _seglab_ci_startup():
    import os
    os.environ.setdefault("SEGLAB_PROFILE", "toy")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        from seglab.config import set_threads
    except ImportError:
        return
    set_threads()  # seglab's one thread policy (nbs/00_foundations/00_config.ipynb)


_seglab_ci_startup()
del _seglab_ci_startup
