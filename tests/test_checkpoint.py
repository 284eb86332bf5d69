"""ranet_fast.checkpoint: atomic saving, weights_only loading and strict official-checkpoint loading."""

from __future__ import annotations

import os
import pickle
import re
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from ranet_fast.checkpoint import (CheckpointError, extract_state_dict, load_checkpoint,
                                   load_official_checkpoint, save_checkpoint, write_file_atomic)


class ArbitraryObject:
    """A class that a weights_only load must refuse to instantiate."""

    def __init__(self):
        self.payload = 42


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    model = _small_model()
    state = {"epoch": 3, "arch": "RANet", "best_prec1": 12.5, "state_dict": model.state_dict(),
             "args": {"scale_list": [1, 2, 3], "gpu": "0", "resume": None}, "scores": ["a\tb"]}
    path = tmp_path / "sub" / "ckpt.pth.tar"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["arch"] == "RANet" and loaded["best_prec1"] == 12.5
    assert loaded["args"] == state["args"] and loaded["scores"] == ["a\tb"]
    assert _tensors_equal(loaded["state_dict"], model.state_dict())
    assert os.listdir(path.parent) == ["ckpt.pth.tar"]


def test_crash_while_writing_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"version": torch.tensor([1])}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_crash(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.seek(0)
        handle.truncate(100)  # a partial file on disk, then the process "dies"
        raise KeyboardInterrupt("simulated crash during write")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"version": torch.arange(10_000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth.tar"]
    assert torch.equal(load_checkpoint(path)["version"], torch.tensor([1]))


def test_write_file_atomic_replaces_text(tmp_path):
    path = tmp_path / "latest.txt"
    write_file_atomic(path, "first")
    write_file_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["latest.txt"]


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pth.tar"
    with pytest.raises(CheckpointError, match="nope.pth.tar.*does not exist"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 0.5, 0.95])
def test_truncated_file_is_reported_as_corrupt(tmp_path, keep):
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"state_dict": _small_model().state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"ckpt\.pth\.tar.*truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth.*truncated or corrupt"):
        load_checkpoint(path)


def test_arbitrary_objects_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": ArbitraryObject()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "unsafe.pth" in message
    assert "refusing" in message and "arbitrary Python objects" in message
    assert "ArbitraryObject" in message  # names what it refused
    assert "execute arbitrary code" in message and "weights_only=True" in message


def test_plain_pickle_of_an_object_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"x": ArbitraryObject()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*plain.pkl"):
        load_checkpoint(path)


def test_extract_state_dict_strips_module_prefix():
    weights = OrderedDict([("module.a.weight", torch.ones(2)), ("module.b.bias", torch.zeros(1))])
    stripped = extract_state_dict({"state_dict": weights, "epoch": 1})
    assert list(stripped) == ["a.weight", "b.bias"]
    assert torch.equal(stripped["a.weight"], torch.ones(2))
    # A raw state dict without prefixes is returned as is.
    raw = OrderedDict([("a.weight", torch.ones(2))])
    assert list(extract_state_dict(raw)) == ["a.weight"]
    # Only a prefix on every key is a DataParallel prefix.
    mixed = OrderedDict([("module.a", torch.ones(1)), ("b", torch.ones(1))])
    assert list(extract_state_dict(mixed)) == ["module.a", "b"]


@pytest.mark.parametrize("bad", [{}, {"state_dict": {"a": 3}}, [1, 2], {"state_dict": None}])
def test_extract_state_dict_rejects_non_state_dicts(bad):
    with pytest.raises(ValueError):
        extract_state_dict(bad)


def test_load_official_checkpoint_with_module_prefix(tmp_path):
    source = _small_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    official = {"epoch": 299, "arch": "RANet", "best_prec1": 90.0, "optimizer": {},
                "state_dict": OrderedDict(("module." + k, v) for k, v in source.state_dict().items())}
    path = tmp_path / "official.pth.tar"
    torch.save(official, path)
    target = _small_model()
    returned = load_official_checkpoint(target, path)
    assert returned["epoch"] == 299
    assert _tensors_equal(target.state_dict(), source.state_dict())


def test_strict_mismatch_names_file_and_keys_and_changes_nothing(tmp_path):
    source = _small_model().state_dict()
    source["extra.weight"] = torch.zeros(1)
    del source["1.running_mean"]
    source["0.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "mismatch.pth.tar"
    save_checkpoint({"state_dict": source}, path)
    target = _small_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_official_checkpoint(target, path)
    message = str(caught.value)
    assert "mismatch.pth.tar" in message
    assert "missing keys: 1.running_mean" in message
    assert "unexpected keys: extra.weight" in message
    assert "0.weight (checkpoint (5, 3, 3, 3), model (4, 3, 3, 3))" in message
    assert _tensors_equal(target.state_dict(), before)


def test_trainer_checkpoint_dict_loads_with_weights_only(tmp_path):
    """Everything the trainer stores (optimizer, RNG states, args) is weights_only-loadable."""
    from ranet_fast.train.runtime import restore_rng_state, rng_state

    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {"epoch": 0, "arch": "RANet", "state_dict": model.state_dict(), "best_prec1": 1.0,
             "optimizer": optimizer.state_dict(), "args": {"lr": 0.1, "scale_list": [1, 2], "gpu": "0"},
             "scores": ["epoch\tlr"], "rng": rng_state()}
    path = tmp_path / "trainer.pth.tar"
    save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    # The restored generators continue exactly where the saved ones were.
    expected = (torch.rand(3), np.random.rand(), random.random())
    restore_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    fresh = torch.optim.SGD(_small_model().parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.pth.tar"
    torch.save({"state_dict": _small_model().state_dict(), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    target = _small_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint '.*malicious\.pth\.tar'.*io\.open"):
        load_official_checkpoint(target, path)
    assert not marker.exists()
    assert _tensors_equal(target.state_dict(), before)


def test_official_checkpoint_loads_into_a_ddp_wrapped_model(tmp_path):
    """A DataParallel checkpoint ('module.' keys) loads into the module a DDP wrapper holds."""
    import torch.distributed as dist

    source = _small_model()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(-1.0)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in source.state_dict().items())}, path)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(_small_model())
        load_official_checkpoint(wrapped, path)
        assert _tensors_equal(wrapped.module.state_dict(), source.state_dict())
    finally:
        dist.destroy_process_group()


def test_resume_with_other_architecture_names_file_and_keys_and_writes_nothing(tmp_path, capsys):
    """--resume with flags that build another RANet stops with the mismatch and leaves the run's files alone."""
    import ranet_fast.train.__main__ as trainer

    tiny = ["--data", "synthetic", "--synthetic-size", "16,8,8", "-b", "8", "-j", "0", "--nChannels", "4",
            "--step", "1", "--nBlocks", "1", "--block-step", "1", "--device", "cpu", "--epochs", "2",
            "--max-steps-per-epoch", "1", "--save", str(tmp_path / "run")]
    trainer.main(tiny + ["--growthRate", "4", "--epochs", "1"])
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as caught:
        trainer.main(tiny + ["--growthRate", "8", "--resume"])
    assert caught.value.code == 1
    error = capsys.readouterr().err
    assert re.search(r"checkpoint '.*checkpoint_000\.pth\.tar' does not match the model \(\d+ shape mismatches: ", error)
    assert re.search(r"\(checkpoint \(\d+,\), model \(\d+,\)\)", error) and "check that the architecture flags match" in error
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
