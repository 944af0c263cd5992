"""Checkpoints: written atomically, read without unpickling code.

A dllab checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path, weights_only=True)``: PyTorch's restricted unpickler refuses any other object,
which is what keeps a checkpoint from a stranger from running code on your machine. Writes go to a
temporary file in the same folder, are flushed to disk and then renamed over the old file, so a
crash or a full disk mid-write never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "dllab-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, foreign or unsafe, or one that could not be written."""


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it and rename it over ``path``.

    On any error the temp file is removed and the old ``path`` (if any) is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically save ``state`` (tagged with dllab's format and version) to ``path``.

    Raises :class:`CheckpointError` naming the path and the OS error (no space left, permission
    denied, ...) when it cannot be written; an older checkpoint at ``path`` survives intact.
    """
    state = {"format": FORMAT, "version": VERSION, **state}
    try:
        return atomic_write_bytes(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint, if any, "
            "is unchanged (free some disk space or choose a writable --out)"
        ) from e


#: what a checkpoint's pickle may import: torch's tensor and storage rebuilders, OrderedDict
_SAFE_IMPORTS = ("torch", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def pickled_imports(path: str | os.PathLike) -> list[str]:
    """The ``module.name`` objects a pickle file (raw, or the ``data.pkl`` of a torch.save zip)
    would import beyond torch's own, read from its opcodes without unpickling anything.

    torch's weights_only loader stops at the first opcode it does not support, which for a raw
    pickle of protocol 4 is a framing opcode that comes before any object: this tells what the
    file would have run. Empty for a file that is not a readable pickle at all.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings = [*strings[-1:], arg]
            elif op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found.append(".".join(strings))
    except Exception:  # noqa: BLE001 - truncated or not a pickle: what was read so far counts
        pass
    return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_IMPORTS)]


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: names weights in a protocol."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a dllab checkpoint with ``torch.load(weights_only=True)``.

    ``mmap=True`` maps the file's tensors instead of reading them (``torch.load``'s own flag), for
    a caller that reads only the plain entries (epoch, step): the tensors are read from the file
    on first use, if ever. Files that are not zip archives (older or foreign formats) are read.

    Raises :class:`CheckpointError` for a missing file, a truncated/corrupt file, a file holding
    objects other than tensors and containers (refused, never executed), or a file that is not a
    dllab checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            # torch maps zip-format files only: anything else is read (and refused or loaded) as before
            state = torch.load(path, map_location=map_location, weights_only=True,
                               mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        text = str(e)
        named = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln]
        imports = ", ".join(pickled_imports(path)) or (named[0] if named else "")
        if not imports:  # not an object, just bytes gone wrong
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a torch.save file "
                                  f"that weights_only=True can read)") from e
        raise CheckpointError(
            f"refusing to load {path}: it holds objects that safe (weights_only) loading forbids, "
            f"and loading it could run code from the file ({imports})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dllab checkpoint (no 'format': {FORMAT!r} entry); "
            "it may be a bare state_dict or another tool's file"
        )
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer dllab (checkpoint version {state['version']} > {VERSION})"
        )
    return state
