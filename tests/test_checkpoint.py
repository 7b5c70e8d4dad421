import pytest
import torch

from fastnet import checkpoint as ckpt


def _state(v: float) -> dict:
    return {"version": ckpt.VERSION, "model": {"w": torch.full((3,), v)}, "rng": ckpt.rng_state()}


def test_round_trip_and_weights_only(tmp_path):
    p = ckpt.save_atomic(_state(1.0), tmp_path / "c" / "last.pt")
    s = ckpt.load(str(tmp_path / "c"))  # a directory resolves to last.pt
    assert torch.equal(s["model"]["w"], torch.ones(3))
    assert not p.with_name("last.pt.tmp").exists()


def test_failed_write_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(_state(1.0), path)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic(_state(2.0), path)
    assert path.read_bytes() == good
    monkeypatch.undo()
    assert torch.equal(ckpt.load(str(path))["model"]["w"], torch.ones(3))


def test_missing_corrupt_and_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="refusing to start a fresh run"):
        ckpt.load(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        ckpt.load(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a fastnet checkpoint"):
        ckpt.load(str(foreign))


def test_rng_state_restores_streams():
    state = ckpt.rng_state()
    a = torch.rand(4)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), a)
