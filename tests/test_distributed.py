"""Multi-process runs: torchrun without ``init_process_group`` gets a process group from
flowsolve (never N lone copies), for training, data-set evaluation and the CLI.

The multi-process tests launch torchrun (2 gloo processes on the CPU) in a subprocess:
``python -m torch.distributed.run`` is the ``torchrun`` command of this interpreter. The
pytest process itself never initialises a process group that outlives a test.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import flowsolve as fs
from flowsolve._core.distributed import ensure_process_group
from flowsolve._core.files import load_checked_file
from flowsolve.cli.main import main
from flowsolve.likelihood.dataset import evaluate_dataset

ROOT = Path(__file__).resolve().parents[1]
# `python -m torch.distributed.run` is this interpreter's `torchrun`
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID")


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    return monkeypatch


# -- ensure_process_group in this process -------------------------------------------------------
def test_one_process_without_the_torchrun_environment(no_launch_env):
    assert ensure_process_group("cpu") == (0, 1)
    no_launch_env.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert ensure_process_group("cpu") == (0, 1)
    assert not dist.is_initialized()


def test_an_initialised_group_is_used_as_it_is(no_launch_env, tmp_path):
    no_launch_env.setenv("WORLD_SIZE", "2")  # the group, not the environment, decides
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    group = dist.group.WORLD
    try:
        assert ensure_process_group("cpu") == (0, 1)
        assert dist.group.WORLD is group  # kept, not replaced by a group of its own
        assert dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("missing", ["RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_an_incomplete_launch_environment_is_refused_with_the_call_to_make(no_launch_env,
                                                                           missing):
    """WORLD_SIZE > 1 without what env:// needs: refused, naming the variable, the launch
    command and the init_process_group call; train and the data-set evaluator refuse too,
    rather than running alone."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for name, value in env.items():
        if name != missing:
            no_launch_env.setenv(name, value)
    with pytest.raises(ValueError) as exc:
        ensure_process_group("cpu")
    message = str(exc.value)
    assert f"{missing} is not set" in message
    assert "torchrun --nproc_per_node=2" in message
    assert "torch.distributed.init_process_group(backend" in message and "world_size=2" in message
    cfg = fs.TrainConfig(steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=f"{missing} is not set"):
        fs.train(fs.MLP(2, hidden=8, depth=1), "moons", cfg)
    with pytest.raises(ValueError, match=f"{missing} is not set"):
        evaluate_dataset(lambda b, i: {"s": b.sum(1)}, torch.zeros(4, 2), progress=False)
    assert not dist.is_initialized()


def test_a_bad_world_size_is_named(no_launch_env):
    no_launch_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        ensure_process_group("cpu")


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"),
                                                 ("cuda", "cpu:gloo,cuda:nccl")])
def test_the_backend_follows_the_device(no_launch_env, device, backend):
    """gloo on the CPU; NCCL for CUDA tensors with gloo beside it (object collectives)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        no_launch_env.setenv(name, value)
    calls = []

    class Stop(Exception):
        pass

    def fake_init(backend, **kwargs):
        calls.append((backend, kwargs))
        raise Stop  # nothing is initialised, no exit hook registered

    no_launch_env.setattr(dist, "init_process_group", fake_init)
    with pytest.raises(Stop):
        ensure_process_group(device)
    assert calls == [(backend, {"init_method": "env://"})]


# -- torchrun: 2 gloo processes -----------------------------------------------------------------
def test_example_trains_and_evaluates_on_two_processes(tmp_path):
    """examples/multi_process.py (no init_process_group call) under torchrun: one run of two
    ranks, not two runs of one. The checkpoint says world_size 2, the ranks end with the same
    weights and logged losses, and the sharded data-set likelihood, gathered on both ranks,
    is the single-process one."""
    out = tmp_path / "run"
    done = torchrun([str(ROOT / "examples" / "multi_process.py"), "--out", str(out),
                     "--steps", "30"], cwd=tmp_path)
    assert done.stdout.count("2 process(es), global batch 128") == 1  # rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "rank0.pt", "rank1.pt", "summary.json"]  # one checkpoint
    ckpt = load_checked_file(out / "checkpoint.pt", "training checkpoint")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 30
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for key in ("model", "ema"):
        a, b = ranks[0][key], ranks[1][key]
        assert all(torch.equal(a[k], b[k]) for k in a), key  # DDP: one model
        assert all(torch.equal(a[k], ckpt[key][k]) for k in a), key
    assert ranks[0]["losses"] == ranks[1]["losses"] == ckpt["history"]["loss"]  # averaged
    assert len(ranks[0]["losses"]) == 5
    assert torch.equal(ranks[0]["log_prob"], ranks[1]["log_prob"])  # gathered on every rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 128

    # the same points and weights in this single process
    net = fs.MLP(2, hidden=64, depth=2)
    net.load_state_dict(ranks[0]["ema"])
    net = net.double().eval()
    x = ranks[0]["x"]
    assert x.shape == (64, 2)
    one = fs.dataset_log_likelihood(net, x, batch_size=16, solver="rk4", steps=8,
                                    progress=False)["log_prob"]
    torch.testing.assert_close(ranks[0]["log_prob"], one, rtol=0, atol=1e-10)
    whole = fs.log_likelihood(net, x, solver="rk4", steps=8).log_prob
    torch.testing.assert_close(ranks[0]["log_prob"], whole, rtol=0, atol=1e-10)


DRIVER = textwrap.dedent("""
    import atexit, json, os, sys
    import torch
    import torch.distributed as dist
    import flowsolve as fs
    from flowsolve.cli.main import main
    from flowsolve.likelihood.dataset import evaluate_dataset

    out = sys.argv[1]
    rank = int(os.environ["RANK"])

    def at_exit():  # registered first, so it runs after flowsolve's own exit hook
        with open(f"{out}/exit{rank}.json", "w") as f:
            json.dump({"initialised": dist.is_initialized()}, f)

    atexit.register(at_exit)
    assert not dist.is_initialized()
    x = torch.linspace(-2, 2, 14, dtype=torch.float64).reshape(7, 2)
    ll = fs.dataset_log_likelihood(lambda z, t: -z, x, batch_size=2, solver="rk4", steps=4,
                                   progress=False)  # the first flowsolve call: it makes the group
    world = dist.get_world_size()
    who = evaluate_dataset(lambda b, i: {"rank": torch.full((len(b),), float(rank)),
                                         "index": torch.arange(i, i + len(b)).double()},
                           x, batch_size=2, progress=False)
    torch.save({"world": world, "log_prob": ll["log_prob"], "x": x, "who": who},
               f"{out}/rank{rank}.pt")
    # the CLI's handlers, as `torchrun -m flowsolve train / likelihood` runs them
    sys.exit(main(["train", "--data", "moons", "--method", "cfm", "--steps", "20",
                   "--batch-size", "32", "--hidden", "16", "--depth", "1",
                   "--out", f"{out}/cli/model.pt"])
             or main(["likelihood", "--model", f"{out}/cli/model.pt", "--n", "9",
                      "--solver", "rk4", "--steps", "4", "--out", f"{out}/cli/ll.csv"]))
""")


def test_dataset_likelihood_and_cli_under_torchrun(tmp_path):
    """A script whose first flowsolve call is the data-set likelihood, then the CLI's train
    and likelihood. The group is made by the data-set call; each rank evaluates its
    contiguous slice and both get the whole, equal to one process. The CLI's train writes one
    model file recording world_size 2, its likelihood one CSV equal to a one-process run,
    each printed once. The group flowsolve made is destroyed at exit."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    done = torchrun([str(tmp_path / "driver.py"), str(out)], cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "cli", "exit0.json", "exit1.json", "rank0.pt", "rank1.pt"]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 7 points: rank 0 holds [0, 4), rank 1 [4, 7); both return all 7 in data order
    for r in ranks:
        assert r["who"]["rank"].tolist() == [0, 0, 0, 0, 1, 1, 1]
        assert r["who"]["index"].tolist() == list(range(7))
    assert torch.equal(ranks[0]["log_prob"], ranks[1]["log_prob"])
    one = fs.log_likelihood(lambda z, t: -z, ranks[0]["x"], solver="rk4", steps=4).log_prob
    torch.testing.assert_close(ranks[0]["log_prob"], one, rtol=0, atol=1e-10)
    for r in (0, 1):  # flowsolve's exit hook destroyed the group it made
        assert json.loads((out / f"exit{r}.json").read_text()) == {"initialised": False}

    # flowsolve train: rank 0 alone writes and reports
    assert sorted(p.name for p in (out / "cli").iterdir()) == ["ll.csv", "model.pt"]
    assert done.stdout.count("trained cfm on moons") == 1, done.stdout
    assert "on 2 processes (global batch 2 x 32)" in done.stdout
    saved = load_checked_file(out / "cli" / "model.pt", "model file")
    assert saved["trained"]["world_size"] == 2
    # flowsolve likelihood: sharded, gathered, the one-process numbers
    assert done.stdout.count("log-likelihood of 9 moons points") == 1, done.stdout
    assert "exact sharded over 2 processes" in done.stdout
    alone = tmp_path / "alone.csv"
    assert main(["likelihood", "--model", str(out / "cli" / "model.pt"), "--n", "9",
                 "--solver", "rk4", "--steps", "4", "--out", str(alone)]) == 0
    sharded = [float(v) for v in (out / "cli" / "ll.csv").read_text().split()[1:]]
    single = [float(v) for v in alone.read_text().split()[1:]]
    assert len(sharded) == 9
    assert sharded == pytest.approx(single, abs=1e-8)  # 10 digits written


PAGE = ROOT / "docs" / "howto" / "multi-process.md"


def documented_commands() -> list[list[str]]:
    """The torchrun command lines of the page's bash blocks, as argument lists."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    return [shlex.split(line) for block in blocks for line in block.splitlines()
            if line.startswith(".venv/bin/torchrun ")]


@pytest.mark.slow
def test_the_documented_commands_run_as_written(tmp_path):
    """Every torchrun command of docs/howto/multi-process.md, in order (the example with its
    defaults, then the command's train and likelihood), and what each writes."""
    commands = documented_commands()
    assert len(commands) == 3
    for command in commands:
        assert command[1:3] == ["--standalone", "--nproc_per_node=2"], command
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in command[3:]]
        done = torchrun(args, cwd=tmp_path)
        if "examples/multi_process.py" in command:
            assert done.stdout.count("2 process(es)") == 1
        elif "train" in command:
            assert done.stdout.count("on 2 processes") == 1
        else:
            assert done.stdout.count("sharded over 2 processes") == 1
    summary = json.loads((tmp_path / "runs" / "multi_process" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ll.csv", "model.pt", "runs"]
    assert len((tmp_path / "ll.csv").read_text().split()) == 1 + 500
