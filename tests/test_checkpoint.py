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


def test_restore_rng_takes_this_ranks_state():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.rng_state())
    ckpt.restore_rng(states, rank=1, world_size=2, seed=0, step=5)
    torch.manual_seed(2)
    expect = torch.rand(3)
    ckpt.restore_rng(states, rank=1, world_size=2, seed=0, step=5)
    assert torch.equal(torch.rand(3), expect)
    ckpt.restore_rng(states[0], rank=1, world_size=2, seed=0, step=5)  # an older checkpoint: one state
    old = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), old)
    # another world size: a fresh stream per rank, the same on every resume, different across ranks
    draws = []
    for rank in (0, 1, 0):
        ckpt.restore_rng(states, rank=rank, world_size=3, seed=0, step=5)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_resume_path_forms(tmp_path):
    from fastnet.checkpoint import resolve_resume_path

    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"x")
    for form in (tmp_path / "run", ck.parent, ck):
        assert resolve_resume_path(str(form)) == ck
    with pytest.raises(FileNotFoundError, match="no checkpoint in that directory"):
        resolve_resume_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or run directory"):
        resolve_resume_path(str(tmp_path / "nope"))
