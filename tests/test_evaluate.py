"""Data-set evaluation: order, resumption, and sharding across two gloo ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
