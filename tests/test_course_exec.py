"""`seglab.course.execute_notebook` fails fast instead of hanging: a cell past the per-cell timeout, or a kernel that
dies or stops answering, gets the notebook one more run in a fresh kernel, then a RuntimeError that names the notebook
and the cell (CI twice saw the site build wait forever on an idle kernel)."""
import time

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from seglab.course import execute_notebook


def _notebook(path, *sources):
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


def test_a_cell_past_the_timeout_fails_fast_with_the_notebook_and_cell_named(tmp_path):
    "A real kernel: cell 1 sleeps far past a 3 s timeout; two runs (the log file counts them), then a clear error."
    nb = _notebook(tmp_path / "sleepy.ipynb", "open('runs.log', 'a').write('run\\n')", "import time\ntime.sleep(600)")
    t0 = time.time()
    with pytest.raises(RuntimeError) as e:
        execute_notebook(nb, tmp_path / "out.ipynb", timeout=3)
    msg = str(e.value)
    assert "sleepy.ipynb: cell 1 (`import time`) ran past the 3 s cell timeout, on each of 2 runs" in msg, msg
    assert (tmp_path / "runs.log").read_text() == "run\nrun\n", "the notebook runs once more in a fresh kernel"
    assert time.time() - t0 < 240, "fails within the timeouts, not after the sleep"
    assert not (tmp_path / "out.ipynb").exists(), "nothing half-written"


class FakeExecutor:
    "Raises the given errors on successive runs (None: the run succeeds and writes an output), on cell 1."
    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, nb, cwd, timeout, where):
        self.calls += 1
        where["cell"] = 1
        err = self.errors.pop(0)
        if err is not None:
            raise err
        nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="ok\n")]


@pytest.mark.parametrize("first", [CellTimeoutError("Cell execution timed out"), DeadKernelError("Kernel died"),
                                   RuntimeError("Kernel didn't respond in 120 seconds")])
def test_one_retry_after_a_kernel_timeout_or_death(tmp_path, first):
    nb = _notebook(tmp_path / "flaky.ipynb", "x = 1", "print('ok')")
    fake = FakeExecutor(first, None)
    execute_notebook(nb, tmp_path / "out.ipynb", run=fake)
    assert fake.calls == 2
    assert nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[1].outputs[0]["text"] == "ok\n"


def test_a_second_failure_names_the_notebook_and_cell(tmp_path):
    nb = _notebook(tmp_path / "dying.ipynb", "x = 1", "print('ok')")
    fake = FakeExecutor(DeadKernelError("Kernel died"), DeadKernelError("Kernel died"))
    with pytest.raises(RuntimeError, match=r"dying\.ipynb: cell 1 \(`print\('ok'\)`\) lost its kernel "
                                           r"\(DeadKernelError: Kernel died\), on each of 2 runs"):
        execute_notebook(nb, tmp_path / "out.ipynb", run=fake)
    assert fake.calls == 2 and not (tmp_path / "out.ipynb").exists()


def test_a_cell_that_raises_is_not_rerun(tmp_path):
    nb = _notebook(tmp_path / "bad.ipynb", "x = 1", "1 / 0")
    fake = FakeExecutor(CellExecutionError("traceback", "ZeroDivisionError", "division by zero"))
    with pytest.raises(RuntimeError, match=r"bad\.ipynb: cell 1 \(`1 / 0`\) failed"):
        execute_notebook(nb, tmp_path / "out.ipynb", run=fake)
    assert fake.calls == 1


def test_the_watchdog_turns_a_hang_outside_any_timeout_into_an_error():
    "`_watched`: work that stops making progress is stopped (`on_stall`) and raises TimeoutError, not waited on forever."
    import threading
    from seglab.course import _watched
    stop, stalled = threading.Event(), []
    beat = [time.monotonic()]
    t0 = time.time()
    with pytest.raises(TimeoutError, match="no progress for 1 s"):
        _watched(lambda: stop.wait(60), beat, stall=1, on_stall=lambda: (stalled.append(1), stop.set()), poll=0.1)
    assert stalled == [1] and time.time() - t0 < 10
    assert _watched(lambda: 42, [time.monotonic()], stall=1, on_stall=lambda: None) == 42
    with pytest.raises(ZeroDivisionError):
        _watched(lambda: 1 / 0, [time.monotonic()], stall=1, on_stall=lambda: None)
