"""Data-set evaluation: order, resumption, and sharding across two gloo ranks."""

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowsolve._core.files import save_checked
from flowsolve.likelihood.dataset import evaluate_dataset, shard_bounds


def squared_norm(batch, offset):
    idx = torch.arange(offset, offset + batch.shape[0])
    return {"sq": (batch.flatten(1) ** 2).sum(1), "index": idx}


@pytest.mark.parametrize("n, world", [(10, 3), (7, 7), (5, 2), (3, 4)])
def test_shards_cover_the_data_in_order(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_results_are_in_dataset_order(gen):
    data = torch.randn(23, 2, 3, generator=gen)
    out = evaluate_dataset(squared_norm, data, batch_size=5, progress=False)
    torch.testing.assert_close(out["sq"], (data.flatten(1) ** 2).sum(1))
    assert out["index"].tolist() == list(range(23))


def test_datasets_of_tuples_use_the_first_element(gen):
    xs = torch.randn(6, 2, generator=gen)
    pairs = [(xs[i], i) for i in range(6)]
    out = evaluate_dataset(squared_norm, pairs, batch_size=4, progress=False)
    torch.testing.assert_close(out["sq"], (xs**2).sum(1))


def test_resume_skips_finished_batches(tmp_path, gen):
    data = torch.randn(20, 2, generator=gen)
    calls = []

    def flaky(batch, offset):
        calls.append(offset)
        if offset == 12 and len(calls) < 10:
            raise RuntimeError("interrupted")
        return squared_norm(batch, offset)

    ckpt = tmp_path / "ll.pt"
    with pytest.raises(RuntimeError):
        evaluate_dataset(flaky, data, batch_size=4, checkpoint=ckpt, progress=False)
    assert calls == [0, 4, 8, 12] and ckpt.exists()
    calls.extend([0] * 6)  # let the next attempt at offset 12 succeed
    out = evaluate_dataset(flaky, data, batch_size=4, checkpoint=ckpt, progress=False)
    assert calls[10:] == [12, 16]  # resumed: batches 0, 4, 8 were not recomputed
    torch.testing.assert_close(out["sq"], (data**2).sum(1))
    assert not ckpt.exists()


def test_checkpoint_for_other_data_is_refused(tmp_path, gen):
    ckpt = tmp_path / "ll.pt"
    data = torch.randn(8, 2, generator=gen)

    def stop_after_first(batch, offset):
        if offset > 0:
            raise RuntimeError("stop")
        return squared_norm(batch, offset)

    with pytest.raises(RuntimeError):
        evaluate_dataset(stop_after_first, data, batch_size=4, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="written for 8 samples"):
        evaluate_dataset(squared_norm, data[:6], batch_size=4, checkpoint=ckpt, progress=False)


def test_bad_batch_size_and_bad_outputs_raise(gen):
    data = torch.randn(4, 2, generator=gen)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_dataset(squared_norm, data, batch_size=0)
    with pytest.raises(ValueError, match="expected"):
        evaluate_dataset(lambda b, o: {"x": torch.zeros(1)}, data, batch_size=2, progress=False)


def _worker(rank, world, init_file, data, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = evaluate_dataset(squared_norm, data, batch_size=3, progress=False)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [11, 1])  # 1: rank 1's slice is empty, it contributes {}
def test_two_gloo_ranks_gather_the_whole_in_order(tmp_path, gen, n):
    data = torch.randn(n, 2, generator=gen)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), data, str(tmp_path)), nprocs=2)
    expected = (data**2).sum(1)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(out["sq"], expected)
        assert out["index"].tolist() == list(range(n))


def _fake_rank(monkeypatch, rank, world):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)


def test_rank_checkpoint_from_another_world_size_is_refused(tmp_path, gen, monkeypatch):
    """Rank 0 of 2 holds [0, 4) of 8 samples; rank 0 of 3 would own [0, 3): resuming its
    file would count samples 3 (and the finished batch) twice across ranks."""
    data = torch.randn(8, 2, generator=gen)
    ckpt = tmp_path / "ll.pt"

    def stop_after_first(batch, offset):
        if offset > 0:
            raise RuntimeError("stop")
        return squared_norm(batch, offset)

    _fake_rank(monkeypatch, 0, 2)
    with pytest.raises(RuntimeError):
        evaluate_dataset(stop_after_first, data, batch_size=2, checkpoint=ckpt, progress=False)
    saved = torch.load(tmp_path / "ll.pt.rank0", weights_only=True)
    assert (saved["start"], saved["end"], saved["world_size"], saved["next"]) == (0, 4, 2, 2)
    _fake_rank(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match=r"slice \[0, 4\) of 2 ranks.*\[0, 3\) of 3 ranks"):
        evaluate_dataset(squared_norm, data, batch_size=2, checkpoint=ckpt, progress=False)


def test_an_empty_data_set_is_refused():
    """It returned {} (every key missing) rather than say there was nothing to evaluate."""
    with pytest.raises(ValueError, match=r"data is empty \(len 0\).*at least one sample"):
        evaluate_dataset(squared_norm, torch.empty(0, 2), progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        evaluate_dataset(squared_norm, [], progress=False)


def _stop_after_first(batch, offset):
    if offset > 0:
        raise RuntimeError("stop")
    return squared_norm(batch, offset)


def test_resume_compares_the_fingerprint_and_the_data_evaluated(tmp_path, gen):
    """The checkpoint records the caller's fingerprint and a hash of the samples already
    evaluated ([0, 4) here): another fingerprint, or other values among those samples, are
    refused, each named; other values only among the samples not yet evaluated are not a
    difference (they are evaluated now)."""
    data = torch.randn(8, 2, generator=gen)
    ckpt = tmp_path / "ll.pt"
    fp = {"solver": "rk4", "t_interval": (0.0, 1.0), "weights": "sha256:ab"}
    with pytest.raises(RuntimeError):
        evaluate_dataset(_stop_after_first, data, batch_size=4, checkpoint=ckpt, progress=False,
                         fingerprint=fp)
    where = re.escape(str(ckpt))
    with pytest.raises(ValueError, match=rf"checkpoint {where} was written with solver='rk4' "
                       r"\(this call: 'euler'\); with weights='sha256:ab' \(this call: "
                       r"\(not recorded\)\)\. .*or remove"):
        evaluate_dataset(squared_norm, data, batch_size=4, checkpoint=ckpt, progress=False,
                         fingerprint={"solver": "euler", "t_interval": (0.0, 1.0)})
    other = data.clone()
    other[2, 1] += 1e-6
    with pytest.raises(ValueError, match=r"for other data: the 4 samples already evaluated "
                       r"\(\[0, 4\)\) differ"):
        evaluate_dataset(squared_norm, other, batch_size=4, checkpoint=ckpt, progress=False,
                         fingerprint=fp)
    with pytest.raises(ValueError, match="for other data"):  # same values, another dtype
        evaluate_dataset(squared_norm, data.double(), batch_size=4, checkpoint=ckpt,
                         progress=False, fingerprint=fp)
    later = data.clone()
    later[6] = 0.0  # not yet evaluated: resumes, and the result is this call's data
    out = evaluate_dataset(squared_norm, [(row, 0) for row in later], batch_size=4,
                           checkpoint=ckpt, progress=False, fingerprint=dict(fp))
    torch.testing.assert_close(out["sq"], (later**2).sum(1))


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path, gen):
    """Files written before the fingerprint (n and batch_size; the oldest without the
    slice) resume, saying what was not checked; the saved batch is used (marked -1)."""
    data = torch.randn(8, 2, generator=gen)
    ckpt = tmp_path / "ll.pt"
    first = {"sq": [torch.full((4,), -1.0)], "index": [torch.arange(4)]}
    for extra in ({"start": 0, "end": 8, "world_size": 1}, {}):
        save_checked({"next": 4, "results": first, "n": 8, "batch_size": 4, **extra}, ckpt)
        with pytest.warns(UserWarning, match=r"written before .* only the number of samples "
                          r"and the batch size were checked.*4 samples already evaluated"):
            out = evaluate_dataset(squared_norm, data, batch_size=4, checkpoint=ckpt,
                                   progress=False, fingerprint={"solver": "rk4"})
        torch.testing.assert_close(out["sq"], torch.cat([torch.full((4,), -1.0),
                                                         (data[4:] ** 2).sum(1)]))
        assert not ckpt.exists()


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, torch.zeros(1), object()],
                         ids=["list", "dict", "tensor", "object"])
def test_fingerprint_values_must_be_plain(bad):
    with pytest.raises(TypeError, match=r"fingerprint\['x'\] must be a str, int, float"):
        evaluate_dataset(squared_norm, torch.zeros(2, 2), progress=False,
                         fingerprint={"x": bad})
