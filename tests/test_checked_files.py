"""Checked torch files: a checksum stored with each checkpoint and verified on load; a
truncated, empty or garbled file gets one clear error naming it (never torch's raw error,
never advice to load with weights_only=False)."""

import re

import pytest
import torch

import flowsolve as fs
from flowsolve._core.files import (
    UnreadableFileError,
    checksum,
    load_checked_file,
    save_checked,
)


def flip_one_bit(path, tensor: torch.Tensor) -> None:
    """Flip the lowest bit of ``tensor``'s first element where its bytes sit in ``path``."""
    raw = bytearray(path.read_bytes())
    needle = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()[:16]
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "the tensor's bytes must occur once"
    raw[at] ^= 1
    path.write_bytes(bytes(raw))


def test_checksum_sees_every_bit_dtype_shape_and_value():
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3, "cfg": {"a": 1.5}}
    base = checksum(state)
    assert checksum({"step": 3, "cfg": {"a": 1.5}, "w": state["w"].clone()}) == base  # order
    flipped = state["w"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit of one float
    assert checksum({**state, "w": flipped}) != base
    assert checksum({**state, "w": state["w"].double()}) != base
    assert checksum({**state, "w": state["w"].reshape(3, 2)}) != base
    assert checksum({**state, "step": 4}) != base
    assert checksum({**state, "cfg": {"a": 1.5000000001}}) != base


def test_a_flipped_bit_in_a_training_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    model = fs.MLP(2, hidden=16, depth=1, generator=torch.Generator().manual_seed(0))
    cfg = fs.TrainConfig(steps=2, batch_size=8, log_every=1, ema_decay=None)
    fs.train(model, "moons", cfg, checkpoint=ckpt, generator=torch.Generator().manual_seed(1))
    weights = torch.load(ckpt, weights_only=True)["model"]["net.0.weight"]
    flip_one_bit(ckpt, weights)
    message = re.escape(f"{ckpt} was changed or damaged after it was written")
    with pytest.raises(UnreadableFileError, match=message):
        fs.load_weights(fs.MLP(2, hidden=16, depth=1), ckpt)
    with pytest.raises(UnreadableFileError, match=message):  # a resume reads it too
        fs.train(fs.MLP(2, hidden=16, depth=1), "moons", fs.TrainConfig(
            steps=3, batch_size=8, log_every=1, ema_decay=None), checkpoint=ckpt)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled", "text"])
def test_an_unreadable_file_gets_one_clear_error(tmp_path, damage):
    path = tmp_path / "state.pt"
    save_checked({"x": torch.randn(64, dtype=torch.float64), "n": 64}, path)
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "garbled": bytes(b ^ 0x5A for b in raw[:200]) + raw[200:],
                      "text": "caf\u00e9 \u00fcber alles\n".encode("latin-1")}[damage])
    with pytest.raises(UnreadableFileError) as info:
        load_checked_file(path, "flowsolve test file")
    text = str(info.value)
    assert text.startswith(str(path)) and "not a flowsolve test file" in text
    assert "delete it or give another path" in text
    assert "weights_only" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_files_written_before_checksums_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "old", "x": torch.ones(3)}, path)
    assert torch.equal(load_checked_file(path, "file")["x"], torch.ones(3))
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_checked_file(tmp_path / "missing.pt", "file")


def test_a_flipped_bit_in_a_dataset_evaluation_checkpoint_is_refused(tmp_path):
    path = fs.AffineGaussianPath(fs.CondOTScheduler())
    u = fs.analytic.marginal_velocity(fs.GaussianMixture.ring(4), path)
    x = fs.GaussianMixture.ring(4).sample(12, generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "eval.pt"
    calls = []

    def interrupted(x, t):  # the second batch stops: the checkpoint holds the first
        calls.append(t)
        if len(calls) > 16:  # rk4, 4 steps: 16 evaluations a batch
            raise KeyboardInterrupt
        return u(x, t)

    with pytest.raises(KeyboardInterrupt):
        fs.dataset_log_likelihood(interrupted, x, batch_size=4, checkpoint=ckpt, solver="rk4",
                                  steps=4, progress=False)
    saved = torch.load(ckpt, weights_only=True)["results"]["log_prob"][0]
    assert saved.shape == (4,)
    flip_one_bit(ckpt, saved)
    with pytest.raises(UnreadableFileError, match="changed or damaged"):
        fs.dataset_log_likelihood(u, x, batch_size=4, checkpoint=ckpt, solver="rk4", steps=4,
                                  progress=False)


def test_files_in_the_formats_of_earlier_releases_still_load(tmp_path):
    """The regrouping into subpackages must not change the format names written into files:
    a training checkpoint ("flowsolve.train/1") and a CLI model file ("flowsolve.cli-model/1")
    as earlier releases wrote them (no checksum) load."""
    from flowsolve.cli.main import _import_the_library, _load_model

    _import_the_library()
    net = fs.MLP(2, hidden=8, depth=1, generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "old.pt"
    torch.save({"format": "flowsolve.train/1", "model": net.state_dict(), "ema": None}, ckpt)
    loaded = fs.load_weights(fs.MLP(2, hidden=8, depth=1), ckpt)
    pairs = zip(loaded.state_dict().values(), net.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    model_file = tmp_path / "model.pt"
    arch = {"dim": 2, "hidden": 8, "depth": 1}
    torch.save({"format": "flowsolve.cli-model/1", "arch": arch, "state_dict": net.state_dict(),
                "trained": {"data": "moons", "source": "normal", "method": "cfm", "sigma": 0.0,
                            "steps": 1, "seed": 0}}, model_file)
    model, saved = _load_model(str(model_file), "cpu")
    assert saved["arch"] == arch and torch.equal(model.state_dict()["net.0.weight"],
                                                 net.state_dict()["net.0.weight"])
