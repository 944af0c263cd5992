"""Run folders: one folder per run, holding everything needed to read, resume or compare it.

::

    RUN/
      config.json      every setting, with dllab/torch versions, seed and device
      metrics.jsonl    one JSON object per logged step or epoch ({"split": "train"|"test", ...})
      summary.json     the run's status (complete, interrupted or failed), epochs reached and
                       planned, and its metrics (final ones once complete)
      checkpoints/     last.pt (resume from here) and best.pt
      figures/         PNGs
      tb/              TensorBoard event files (when tensorboard is installed)

Only rank 0 of a distributed run writes; the other ranks get a :class:`Run` whose writes do
nothing, so training code never has to ask which rank it is on.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from dllab import __version__, _cpu
from dllab.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (exists without --resume, missing on --resume)."""


class CorruptRunFileError(RunFolderError):
    """A run's file that is there but cannot be read (config.json or summary.json that is not JSON):
    a runtime failure (exit code 1, as a corrupt dataset), not a usage error."""


def _jsonable(value: Any) -> Any:
    """Plain JSON types for numbers, tensors, paths and dataclass-ish values; NaN/inf as strings."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; :class:`CorruptRunFileError` naming the file when it is not valid JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptRunFileError(f"{path} is not valid JSON ({e})") from e


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything before it is good
    return records


def environment() -> dict:
    """Versions and machine facts recorded in every config.json."""
    import torchvision

    return {
        "dllab": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": _cpu.cpu_model(),
        "cpu_bf16": _cpu.bf16_flags(),
    }


def is_run(path: str | os.PathLike, damaged: bool = False) -> bool:
    """Whether ``path`` is a dllab run folder: its config.json (dllab writes it first) is dllab's,
    a JSON object naming the run's ``kind`` and ``environment`` (many tools write a config.json).
    With ``damaged``, a config.json that cannot be read as JSON counts too (opening the run then
    names the broken file)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except ValueError:
        return damaged
    except OSError:
        return False
    return isinstance(config, dict) and isinstance(config.get("kind"), str) and "environment" in config


def _own_temporary(path: Path) -> bool:
    """A file an atomic write of dllab's left behind when it was killed (``.NAME.tmp-PID``)."""
    return path.name.startswith(".") and ".tmp-" in path.name and path.is_file()


def _is_empty(path: Path) -> bool:
    return not any(not _own_temporary(child) for child in path.iterdir())


def _inside_a_run(path: Path, option: str) -> None:
    for parent in path.resolve().parents:
        if is_run(parent):
            raise RunFolderError(f"{path} lies inside the dllab run {parent}; choose another {option}")


def holds_runs(path: str | os.PathLike, depth: int = 2) -> bool:
    """Whether a run folder lies inside ``path``, at most ``depth`` levels down: a sweep's, an
    ablation's or a demo's runs lie one level down, ``dllab reproduce``'s two (``STUDY/RUN``)."""
    if depth <= 0 or not Path(path).is_dir():
        return False
    return any(child.is_dir() and (is_run(child) or holds_runs(child, depth - 1))
               for child in Path(path).iterdir())


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """``path`` or the nearest of its parents that exists, when that is not a folder (so nothing
    can be made at ``path``); None otherwise. (dllab.data, a layer of its own, checks its data
    folder alike.)"""
    above = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def _not_a_file(path: Path, option: str) -> None:
    """Refuse ``path`` when it, or the nearest of its parents that exists, is not a folder."""
    blocker = file_in_the_way(path)
    if blocker == path:
        raise RunFolderError(f"{path} is a file, not a folder; choose another {option}")
    if blocker is not None:
        raise RunFolderError(f"{path} lies under {blocker}, a file, not a folder; choose another {option}")


def check_run_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse ``path`` as a new run's folder when a run's files would be mixed into someone else's:
    a :class:`RunFolderError` naming it when it is a file, or a folder that is not empty and holds
    no run (a folder of runs included). A new or empty folder passes, and so does a run (which
    :meth:`Run.create` then continues with ``resume`` and refuses without)."""
    path = Path(path)
    _not_a_file(path, option)
    _inside_a_run(path, option)
    if not path.is_dir() or is_run(path, damaged=True) or _is_empty(path):
        return
    if holds_runs(path):
        raise RunFolderError(f"{path} is a folder of dllab runs, not a run; choose another {option} "
                             "(a new folder inside it, say)")
    raise RunFolderError(f"{path} is not empty and is not a dllab run; choose another {option} or empty it")


def never_trained(path: str | os.PathLike) -> dict | None:
    """What is known of the run in ``path`` when it stopped before it saved any checkpoint: its
    summary.json (status "failed" or "interrupted": out of memory while building, say), or
    ``{"status": "unfinished"}`` when it has none (killed outright in its first epoch, by the
    out-of-memory killer say). None when it has a checkpoint, finished, reached the end of an
    epoch (a test record in metrics.jsonl: its checkpoints were deleted, not never written), or
    cannot be read. Such a run holds no training to continue: :meth:`Run.create` begins it again,
    once it holds the folder's lock (so never while another process trains there)."""
    path = Path(path)
    try:
        summary = read_json(path / "summary.json") if (path / "summary.json").exists() else None
        tested = any(r.get("split") == "test" for r in read_metrics(path))
    except (OSError, ValueError):  # unreadable: not for us to judge, so left as it is
        return None
    if summary is None:
        summary = {"status": "unfinished"}
    if (not isinstance(summary, dict) or summary.get("status") not in ("failed", "interrupted", "unfinished")
            or summary.get("epochs") or tested or any((path / "checkpoints").glob("*.pt"))):
        return None
    return summary


def _clear_untrained_run(path: Path) -> None:
    """Remove what a run that never saved a checkpoint wrote (see :func:`never_trained`): its
    summary, its metrics log (of steps it cannot continue) and TensorBoard events, so that the
    folder holds the run begun again alone."""
    for name in ("summary.json", "metrics.jsonl"):
        (path / name).unlink(missing_ok=True)
    for events in (path / "tb").glob("events.out.tfevents.*"):
        events.unlink()


def _lock_folder(path: Path) -> int | None:
    """This process's exclusive lock on the run folder ``path`` (made if it is new): ``flock`` on
    the folder itself (no lock file), released by :meth:`Run.close` or when the process ends,
    killed or not. A :class:`RunFolderError` when another process holds it: a run trains there
    now, and neither a second run nor a resume may write into it. None where ``flock`` is missing
    (Windows), which then has no such guard."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise RunFolderError(f"cannot write run folder {path}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunFolderError(f"{path} is in use by another process (a dllab run training there now); wait "
                             "for it to end, or stop it, and run this again") from None
    return fd


def check_runs_folder(path: str | os.PathLike, option: str) -> None:
    """Refuse ``path`` as the folder of a command's runs (sweep, ablate, demo, reproduce) unless it
    is new, empty, or already holds dllab runs (the command's earlier ones, which it reuses or
    continues): a :class:`RunFolderError` naming it and ``option`` otherwise, a run itself included."""
    path = Path(path)
    _not_a_file(path, option)
    _inside_a_run(path, option)
    if is_run(path):
        raise RunFolderError(f"{path} is a dllab run, not a folder of runs; choose another {option}")
    if path.is_dir() and not _is_empty(path) and not holds_runs(path):
        raise RunFolderError(f"{path} is not empty and holds no dllab runs; choose another {option} or empty it")


#: settings that say where and how fast a run trains, not what it is: a reused run may differ in them
NOT_COMPARED = ("out", "device", "data_dir")


def check_same_settings(run_dir: str | os.PathLike, config: dict, what: str = "the demo",
                        option: str = "--out") -> None:
    """Refuse to reuse the finished run in ``run_dir`` unless it was trained with ``config`` (the
    settings asked for; :data:`NOT_COMPARED` aside): a :class:`RunFolderError` naming each
    difference, and ``what``'s ``option`` as the way out."""
    saved = read_json(Path(run_dir) / "config.json")
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} asked" for k, v in config.items()
              if k not in NOT_COMPARED and saved.get(k) != v]
    if differ:
        raise RunFolderError(f"{run_dir} holds a finished {saved.get('kind')} run with other settings "
                             f"({'; '.join(differ)}); give {what} another {option}")


#: a run's states (:attr:`Run.status`)
COMPLETE, INTERRUPTED, FAILED, STOPPED, UNFINISHED = ("complete", "interrupted", "failed", "stopped",
                                                     "unfinished")


def unfinished_summary(status: str, *, kind: str, dataset: str, epochs: int, epochs_planned: int,
                       steps: int, error: BaseException | None = None) -> dict:
    """What summary.json says of a run that stopped early: its ``status`` (interrupted, failed,
    stopped), how far it got, and why (``error``, one line). The trainer writes it with the run's
    last numbers around it, and :func:`dllab.train.train` when the trainer could not be built."""
    return {"status": status, "kind": kind, "dataset": dataset, "epochs": epochs,
            "epochs_planned": epochs_planned, "steps": steps,
            **({"error": f"{type(error).__name__}: {str(error).strip()[:300]}"} if error else {})}


def run_status(config: dict, summary: Any) -> str:
    """The state of a run with ``config`` and ``summary`` (None when it has none): the one rule
    that :attr:`Run.status` and the report both apply."""
    if not isinstance(summary, dict) or not summary:
        return UNFINISHED
    status = str(summary.get("status", COMPLETE))  # older dllab wrote a summary only when complete
    planned, reached = config.get("epochs"), summary.get("epochs")
    if (status == COMPLETE and isinstance(planned, int) and isinstance(reached, int)
            and reached < planned):
        return UNFINISHED  # a complete run resumed for more epochs: training now, or killed
    return status


class Run:
    """A run folder. Make one with :meth:`create` (new or ``resume``) or :meth:`open` (read).

    The folder's layout (the module docstring) and the run's state (:attr:`status`) are decided
    here and nowhere else: train, sweep, demo and report ask the run.
    """

    def __init__(self, path: str | os.PathLike, config: dict, *, writer: bool = True):
        self.path = Path(path)
        self.config = config
        self.writer = writer
        self.began_again: dict | None = None  # the summary of a never-trained run this one replaced
        self._unlock: weakref.finalize | None = None  # releases the folder's lock (create)
        self._tb = None
        self._t0 = time.time()
        self._unwritten: dict = {}  # changes update_config made that write_config has not written

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, resume: bool = False,
               writer: bool = True, tensorboard: bool = True) -> Run:
        """Start a run in ``path`` (or continue it with ``resume``).

        A writer holds the folder's lock until :meth:`close` (:func:`_lock_folder`): while another
        process trains there, this is a :class:`RunFolderError`. A folder that already holds a run
        is never overwritten: without ``resume`` that is a :class:`RunFolderError`, unless that run
        stopped before it saved a checkpoint (:func:`never_trained`: out of memory while building,
        say), which is begun again with ``config`` (what is known of it in ``run.began_again``): it
        holds no training to continue, and ``--resume`` could not change the setting that made it
        fail. With ``resume`` such a run starts over too, its summary, log and events cleared, and
        otherwise the saved config is returned in ``run.config`` (the caller decides which new
        settings, such as a larger epoch count, may override it).
        """
        path = Path(path)
        if resume and not (path / "config.json").exists():
            raise RunFolderError(f"--resume: no run to resume in {path} (no config.json)")
        if not resume and not (path / "config.json").exists():
            check_run_folder(path)  # a file, or a folder of other files: refused before it is locked
        lock = _lock_folder(path) if writer else None
        try:
            run = cls._create_locked(path, config, resume=resume, writer=writer)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        if lock is not None:
            run._unlock = weakref.finalize(run, os.close, lock)  # also when the run is dropped unclosed
        if writer:
            (path / "checkpoints").mkdir(exist_ok=True)
            (path / "figures").mkdir(exist_ok=True)
            if tensorboard:
                run._open_tensorboard()
        return run

    @classmethod
    def _create_locked(cls, path: Path, config: dict, *, resume: bool, writer: bool) -> Run:
        """:meth:`create`'s work once the folder is locked (by this process, when ``writer``)."""
        has_run = (path / "config.json").exists()
        stopped = never_trained(path) if has_run and writer else None
        if resume:
            if not has_run:
                raise RunFolderError(f"--resume: no run to resume in {path} (no config.json)")
            if stopped is not None:
                _clear_untrained_run(path)  # it starts over: no summary or events of the stopped attempt
            return cls(path, read_json(path / "config.json"), writer=writer)
        if stopped is not None:  # a run that stopped before its first checkpoint: begun again
            _clear_untrained_run(path)
            has_run = False
        if has_run:
            raise RunFolderError(f"{path} already holds a run; continue it with --resume or choose another --out")
        check_run_folder(path)  # a file, or a folder of other files
        config = {**config, "environment": environment(),
                  "created": _dt.datetime.now().isoformat(timespec="seconds")}
        run = cls(path, config, writer=writer)
        run.began_again = stopped
        if writer:
            try:
                path.mkdir(parents=True, exist_ok=True)
                write_json(path / "config.json", config)
            except OSError as e:
                raise RunFolderError(f"cannot write run folder {path}: {e.strerror or e}") from e
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Open an existing run folder for reading (evaluation, reports)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a run folder")
        if not path.is_dir():
            raise RunFolderError(f"run folder {path} does not exist")
        if not (path / "config.json").exists():
            raise RunFolderError(f"{path} is not a dllab run folder (no config.json)")
        config = read_json(path / "config.json")
        if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
            raise RunFolderError(f"{path} is not a dllab run folder (its config.json names no kind)")
        return cls(path, config, writer=False)

    def update_config(self, changes: dict) -> None:
        """Apply settings changed on resume (e.g. more ``epochs``) to ``config``; :meth:`write_config`
        writes them to config.json.

        config.json then describes the run as it is continued; each resume that changed something
        appends ``{"at": time, "changed": {key: [old, new]}}`` to its ``"resumed"`` list.
        """
        changed = {k: [self.config.get(k), v] for k, v in changes.items() if self.config.get(k) != v}
        if not changed:
            return
        self.config.update({k: new for k, (_, new) in changed.items()})
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        self.config["resumed"] = [*self.config.get("resumed", []), {"at": stamp, "changed": changed}]
        self._unwritten.update(changed)

    def write_config(self) -> dict:
        """Write the changes :meth:`update_config` made to config.json (atomically), and return
        them (``{key: [old, new]}``; ``{}`` when there were none, or this Run does not write). The
        trainer calls it once the resumed run has read its checkpoint, so a resume that fails
        before that (a damaged last.pt, say) leaves config.json as it was."""
        if not (self.writer and self._unwritten):
            return {}
        try:
            write_json(self.path / "config.json", self.config)
        except OSError as e:
            raise RunFolderError(f"cannot write run folder {self.path}: {e.strerror or e}") from e
        written, self._unwritten = self._unwritten, {}
        return written

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return
        self._tb = SummaryWriter(log_dir=str(self.path / "tb"))

    # ---- paths ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.get("kind", "")

    def figure_path(self, name: str) -> Path:
        return self.path / "figures" / name

    def checkpoint_path(self, name: str = "last") -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    # ---- metrics --------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (and its numbers to TensorBoard)."""
        if not self.writer:
            return
        record = _jsonable({**record, "time": round(time.time() - self._t0, 3)})
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split = record.get("split", "train")
            step = record.get("step", 0)
            for key, value in record.items():
                if key in ("split", "step", "epoch", "time") or isinstance(value, (str, list, dict)):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` (on resume, so curves don't repeat steps)."""
        if not self.writer:
            return
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write_bytes(self.path / "metrics.jsonl", lambda f: f.write(text.encode()))

    def write_summary(self, summary: dict) -> None:
        if self.writer:
            write_json(self.path / "summary.json", summary)

    def summary(self) -> dict:
        """summary.json (``{}`` before the run has one)."""
        path = self.path / "summary.json"
        return read_json(path) if path.exists() else {}

    @property
    def status(self) -> str:
        """``complete``, ``interrupted`` (SIGINT/SIGTERM), ``failed`` (an error, named in the
        summary's ``error``), ``stopped`` (an alarm under ``--on-alarm stop``) or ``unfinished``
        (no summary, or a complete one for fewer epochs than config.json now plans: training now,
        or killed outright).

        A summary without ``status`` was written by a dllab that wrote one only at the end: complete.
        """
        path = self.path / "summary.json"
        return run_status(self.config, read_json(path) if path.exists() else None)

    @property
    def complete(self) -> bool:
        """True once the run trained every planned epoch and wrote its final analysis."""
        return self.status == COMPLETE

    @property
    def resumable(self) -> bool:
        """True when ``--resume`` continues it: any run that is not complete (one stopped before its
        first checkpoint starts from the beginning). A complete run resumes only with more epochs."""
        return not self.complete

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, name: str, state: dict) -> Path | None:
        if not self.writer:
            return None
        config = json.loads(json.dumps(_jsonable(self.config)))  # plain types: weights_only-safe
        return save_checkpoint({"config": config, **state}, self.checkpoint_path(name))

    def load_checkpoint(self, name: str = "last", map_location="cpu", *, mmap: bool = False) -> dict:
        return load_checkpoint(self.checkpoint_path(name), map_location=map_location, mmap=mmap)

    def has_checkpoint(self, name: str = "last") -> bool:
        return self.checkpoint_path(name).exists()

    def trained(self) -> tuple[int, bool]:
        """How far checkpoints/last.pt has trained: (epochs completed, whether it holds part of the
        next epoch too, as a checkpoint saved mid-epoch does); (0, False) without one. A resume may
        plan no fewer epochs than that."""
        if not self.has_checkpoint("last"):
            return 0, False
        state = self.load_checkpoint("last", mmap=True)  # two numbers: the tensors are not read
        return int(state["epoch"]), int(state.get("batch_in_epoch", 0)) > 0

    def close(self) -> None:
        """Flush and close TensorBoard's writer, and release the folder's lock (:meth:`create`)."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._unlock is not None:
            self._unlock()  # once: a finalizer runs at most one time


__all__ = ["Run", "RunFolderError", "CorruptRunFileError", "run_status", "CheckpointError", "read_metrics",
           "read_json", "write_json", "is_run", "holds_runs", "check_run_folder", "check_runs_folder", "check_same_settings",
           "never_trained", "unfinished_summary", "COMPLETE", "INTERRUPTED", "FAILED", "STOPPED", "UNFINISHED"]
