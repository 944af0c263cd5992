"""Small helpers every trainer needs: seeding, devices, mixed precision, RNG state, progress bars."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterable

import numpy as np
import torch

from dllab._cpu import native_bf16
from dllab.config import DEVICES, PRECISIONS



def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a CPU run repeats number for number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, *parts: int) -> int:
    """A seed for process ``rank`` of a distributed run, distinct per rank (and per ``parts``).

    Rank 0 of a run keeps ``seed`` itself elsewhere; this is for the other ranks, so that their
    random draws (GAN noise, VAE samples) differ from rank 0's. Stable across machines.
    """
    import hashlib

    digest = hashlib.blake2b(repr(("rank", int(seed), int(rank), *map(int, parts))).encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and their sample standard deviation (n - 1; None for one value):
    how dllab summarises a metric over seeds."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device, refusing one that is not there.

    Under torchrun the CUDA device is the process's ``LOCAL_RANK``.
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but it is not available; use --device cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Only there does bf16 autocast beat fp32 (docs/robustness.md measures it per CPU kind); on
    AVX2-only CPUs bf16 is emulated and several times slower. Reads ``/proc/cpuinfo`` on Linux
    and asks torch elsewhere (``dllab._cpu``, which ``dllab.layers`` asks too).
    """
    return native_bf16()


#: environment variable that overrides what ``--precision auto`` picks, on every device
AUTO_PRECISION_ENV = "DLLAB_AUTO_PRECISION"


def auto_precision_override() -> str | None:
    """``fp32`` or ``bf16`` when ``$DLLAB_AUTO_PRECISION`` forces what ``auto`` means, else None.

    Unset or empty means "detect". Any other value is refused (ValueError naming it), so a typo
    cannot silently fall back to detection.
    """
    value = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise ValueError(f"{AUTO_PRECISION_ENV}={value!r} is not one of fp32, bf16 (or unset to detect)")
    return value


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How summary.json and eval.json name an autocast dtype: "bfloat16", "float16", or "fp32" for None."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``auto|fp32|bf16|fp16`` on ``device``; None means plain fp32.

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with AMX/AVX512-BF16, and fp32
    elsewhere (MPS and CPUs without native bf16). ``$DLLAB_AUTO_PRECISION`` (``fp32`` or
    ``bf16``) overrides that detection, on every device: ``bf16`` on a CUDA GPU without bf16
    support still gives fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use bf16 or fp32")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    forced = auto_precision_override()
    if forced == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if forced == "bf16" or cpu_supports_bf16() else None
    return None


def optimizer_options(device: torch.device) -> dict:
    """Keyword arguments that give torch's SGD/Adam/AdamW their fused kernel on ``device``.

    A fused optimiser updates every parameter in one kernel instead of a Python loop over them:
    on this project's 2-core CPU one ResNet-18 SGD (Nesterov) step took 12 ms fused, 42 ms with
    ``foreach`` and 109 ms with the default loop; one Adam step of the VAE 2.5 ms against 9 ms
    (``benchmarks/train_throughput.py`` measures what that does to a training step). Returns
    ``{"fused": True}`` where torch has fused kernels for the device type (CPU and CUDA since
    torch 2.4), else ``{}``.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = _get_fused_kernels_supported_devices()
    except ImportError:
        supported = ["cuda"]
    return {"fused": True} if torch.device(device).type in supported else {}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def get_rng_state() -> dict:
    """Every RNG state a run depends on, as tensors/ints/lists only (``weights_only``-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             quiet: bool = False, leave: bool = False, **kwargs):
    """A tqdm bar on stderr, silent when ``quiet`` or when stderr is not a terminal (where
    :func:`progress_lines` says to write plain lines instead)."""
    from tqdm.auto import tqdm

    disable = _silent(quiet) or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=leave,
                dynamic_ncols=True, **kwargs)


def progress_lines(quiet: bool = False) -> bool:
    """Whether progress goes to stderr as plain lines (one per epoch or stage), flushed as written:
    when stderr is not a terminal (a log file, a pipe, CI), where :func:`progress` draws no bar,
    unless ``quiet`` or ``DLLAB_QUIET=1``."""
    return not _silent(quiet) and not sys.stderr.isatty()


def _silent(quiet: bool) -> bool:
    return quiet or os.environ.get("DLLAB_QUIET") == "1"


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


# aten ops that make the host wait for the device on CUDA: a scalar read (.item(), bool(t),
# float(t), int(t)) or an output whose shape depends on the data
SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero",
                      "aten.masked_select", "aten.unique", "aten._unique2", "aten.repeat_interleave",
                      "aten.equal", "aten.bincount"})
# Tensor methods that read a tensor on the host without an aten operation on a CPU tensor (on a
# GPU each is a device-to-host copy, a sync): count_ops counts their calls as syncs too
SYNC_METHODS = ("tolist", "numpy", "cpu")
# aten ops that only make tensors or views (no kernel runs on a GPU for them)
_NO_KERNEL = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.detach",
                        "aten.alias", "aten.lift_fresh", "aten._unsafe_view", "aten.set_",
                        "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset"})


def _is_view(func) -> bool:
    """Whether an aten operation returns views of its inputs (t, view, split, unbind, ...):
    every output aliases an input and none is written."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class OpCounts:
    """Counts of the aten operations run inside a :func:`count_ops` block.

    ``kernels``: operations that run a kernel (views and bare allocations left out); on a GPU
    each is one launch or more (a ``_foreach_*`` op launches one kernel per chunk of tensors).
    ``syncs``: operations that make the host wait for the device there (:data:`SYNC_OPS`), and
    calls of the Tensor methods that read a tensor on the host (:data:`SYNC_METHODS`: on a CPU
    tensor they run no aten operation, on a GPU they copy to the host).
    ``by_op``: the count of each operation, by name.
    """

    def __init__(self):
        self.kernels = 0
        self.syncs = 0
        self.by_op: dict[str, int] = {}

    def sync_ops(self) -> dict[str, int]:
        return {k: v for k, v in self.by_op.items()
                if k.rsplit(".", 1)[0] in SYNC_OPS or k.startswith("Tensor.")}

    def __repr__(self) -> str:
        return f"OpCounts(kernels={self.kernels}, syncs={self.syncs})"


@contextlib.contextmanager
def count_ops():
    """Count the aten operations a block runs (forward and backward alike), on any device.

    ``with count_ops() as counts: step()`` then ``counts.kernels`` and ``counts.syncs``. It sees
    the operations below autograd, so the CPU shows what a GPU would launch and where it would
    wait: a test can hold the per-step figures of the CUDA code paths down without a GPU.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = OpCounts()

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            packet = f"aten.{func.__name__.split('.')[0]}" if func.namespace == "aten" else str(func)
            name = f"{packet}.{func._overloadname}"
            counts.by_op[name] = counts.by_op.get(name, 0) + 1
            if packet in SYNC_OPS:
                counts.syncs += 1
            if packet not in _NO_KERNEL and not _is_view(func):
                counts.kernels += 1
            return func(*args, **(kwargs or {}))

    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    own = {name for name in SYNC_METHODS if name in vars(torch.Tensor)}  # else inherited

    def counted(name, method):
        def read(self, *args, **kwargs):
            counts.syncs += 1
            counts.by_op[f"Tensor.{name}"] = counts.by_op.get(f"Tensor.{name}", 0) + 1
            return method(self, *args, **kwargs)
        return read

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(name, method))
        with _Counter():
            yield counts
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)
