"""Safe checkpoint files: atomic writes and ``weights_only`` loading with errors that name the file.

A checkpoint is written to a temporary file in the destination directory, flushed and fsynced,
then renamed over the destination with ``os.replace``; the directory is fsynced so the rename
itself survives a crash. A reader therefore sees either the previous complete file or the new
complete file, never a partial one.

Loading always uses ``torch.load(weights_only=True)``: a checkpoint may hold tensors and plain
containers (dict, list, tuple, str, numbers, None) but no arbitrary Python objects, because
unpickling those can run arbitrary code. Official RANet checkpoints (``{'epoch', 'arch',
'state_dict', 'best_prec1', 'optimizer'}`` saved from a ``DataParallel`` model) qualify.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "write_file_atomic",
    "load_checkpoint",
    "extract_state_dict",
    "load_official_checkpoint",
]

# How many key names an error lists before summarising the rest as a count.
_MAX_KEYS_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe to unpickle, or does not fit the model."""


def _fsync_directory(directory: str) -> None:
    # Persist the rename; not every platform or file system can open a directory for fsync.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` atomically: ``path`` is either untouched or complete."""
    _write_atomic(path, lambda handle: torch.save(state, handle))


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace the file ``path`` atomically with ``data`` (text is written as UTF-8): the logs,
    pointers and reports that sit next to checkpoints get the same crash safety."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    _write_atomic(path, lambda handle: handle.write(payload))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is a ``CheckpointError`` naming ``path``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path '{path}' is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for bad files; all become one message
        message = str(error)
        if "Weights only load failed" in message:
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            what = f" (it references {unsafe.group(1)})" if unsafe else ""
            raise CheckpointError(
                f"refusing to load checkpoint '{path}': it contains arbitrary Python objects{what}, "
                "and unpickling those can execute arbitrary code, so ranet_fast loads checkpoints "
                "with torch.load(weights_only=True), which only accepts tensors and plain containers. "
                "If you trust the file, load it yourself and re-save only its tensors "
                "(e.g. {'state_dict': model.state_dict()})") from None
        detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint file '{path}' ({size} bytes) is truncated or corrupt and cannot be read "
            f"({detail.splitlines()[0]})") from error


def _describe_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_LISTED])
    more = len(keys) - _MAX_KEYS_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def extract_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside a checkpoint object, without a DataParallel/DDP ``module.`` prefix.

    ``obj`` is a raw state dict or a dict holding one under ``'state_dict'`` (the official
    checkpoint layout). Raises ``ValueError`` when no state dict of tensors is found.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError("no state dict found: expected a mapping of parameter names to tensors, "
                         "or a dict with a 'state_dict' entry")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"the state dict has entries that are not named tensors: {_describe_keys(not_tensors)}")
    prefix = "module."
    if all(key.startswith(prefix) for key in obj):
        return OrderedDict((key[len(prefix):], value) for key, value in obj.items())
    return OrderedDict(obj)


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> Any:
    """Strictly load the weights of checkpoint ``path`` into ``model`` and return the checkpoint object.

    Accepts ranet_fast checkpoints, official RANet checkpoints (keys prefixed with ``module.``)
    and raw state dicts. Any missing or unexpected key, or a shape mismatch, raises a
    ``CheckpointError`` naming the file and the keys before a single parameter is changed.
    """
    path = os.fspath(path)
    checkpoint = load_checkpoint(path)
    try:
        state_dict = extract_state_dict(checkpoint)
    except ValueError as error:
        raise CheckpointError(f"checkpoint '{path}': {error}") from None

    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    expected = target.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(value.shape)})"
                  for key, value in expected.items()
                  if key in state_dict and state_dict[key].shape != value.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_describe_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_describe_keys(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint '{path}' does not match the model ({'; '.join(problems)}); "
                              "check that the architecture flags match the ones it was trained with")
    target.load_state_dict(state_dict, strict=True)
    return checkpoint
