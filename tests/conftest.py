"""Shared test set-up.

- One intra-op thread (small ops on a busy 2-core machine run many times faster single-threaded,
  and results do not depend on the thread count).
- ``@pytest.mark.cuda``: the test needs a CUDA GPU; skipped, with the reason, where torch sees none.
- ``@pytest.mark.auto_bf16``: the test checks what ``--precision auto`` does where it picks bf16 on
  the CPU (AVX512-BF16 or AMX, or ``DLLAB_AUTO_PRECISION=bf16``); skipped, with the reason, where it
  picks fp32. Tests that pass ``--precision bf16`` themselves run everywhere (emulated bf16 is
  slow but correct).
- Every test runs with SIGINT handled as in a process started from a terminal (``foreground_sigint``).
"""

import signal

import pytest
import torch

from dllab.utils import AUTO_PRECISION_ENV, cpu_supports_bf16, resolve_precision


@pytest.fixture(autouse=True)
def foreground_sigint():
    """SIGINT handled as in a process started from a terminal (Python's KeyboardInterrupt). A shell
    starts its background jobs (``cmd &``) with SIGINT ignored, and dllab keeps that in every phase
    (Ctrl-C is then not meant to reach them; ``test_train.py`` checks it). The signal tests need
    the foreground case, so it is set up here, wherever the suite is started from."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def auto_picks_bf16_on_cpu() -> bool:
    return resolve_precision("auto", torch.device("cpu")) == torch.bfloat16


def pytest_report_header(config):
    picks = "bf16" if auto_picks_bf16_on_cpu() else "fp32"
    import os

    forced = os.environ.get(AUTO_PRECISION_ENV) or "unset"
    return (f"dllab: torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}; "
            f"CPU native bf16: {'yes' if cpu_supports_bf16() else 'no'}; {AUTO_PRECISION_ENV}={forced}; "
            f"--precision auto on the CPU picks {picks}")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch sees none here")
    no_bf16 = pytest.mark.skip(reason=f"--precision auto picks fp32 on this CPU (no AVX512-BF16/AMX); "
                                      f"{AUTO_PRECISION_ENV}=bf16 runs it anyway")
    gpu, bf16 = torch.cuda.is_available(), auto_picks_bf16_on_cpu()
    for item in items:
        if item.get_closest_marker("cuda") and not gpu:
            item.add_marker(no_gpu)
        if item.get_closest_marker("auto_bf16") and not bf16:
            item.add_marker(no_bf16)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
