import os
import sys

import pytest
import torch


# Test files whose Triton-interpreter cases run in one worker process each (tests/_interp.py).
_INTERP_FILES = ("test_train_attention_kernel.py", "test_prefill_kernel.py", "test_decode_kernel.py")


def pytest_collection_modifyitems(config, items):
    _prefetch_interpreter_workers(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _prefetch_interpreter_workers(items) -> None:
    """Start the interpreter workers of the selected interpreter tests in the background now, one at a time in
    the order the session needs them: single-threaded, they use the core the in-process tests leave idle on a
    two-core machine (the suite: 9m09s -> 7m55s on this project's 2-core machine)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1":
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from tests import _interp

    order = []  # in the order the session will need them
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in _INTERP_FILES and "interpreter" in item.name and name not in order:
            order.append(name)
    _interp.prefetch([os.path.join(os.path.dirname(__file__), f) for f in order])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Modules of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): one thread is fastest,
    and much faster on a busy two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))
