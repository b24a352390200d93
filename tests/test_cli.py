"""The flowsolve command: a tiny train -> sample -> likelihood -> transfer round, and errors."""

import math
import os

import pytest
import torch

from flowsolve.cli.main import main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m.pt"
    assert main(["train", "--data", "moons", "--method", "cfm", "--steps", "30",
                 "--batch-size", "64", "--hidden", "32", "--out", str(out)]) == 0
    return out


def test_sample_writes_samples_with_counted_nfe(model_file, tmp_path, capsys):
    out = tmp_path / "s.pt"
    assert main(["sample", "--model", str(model_file), "--n", "50", "--solver", "rk4",
                 "--steps", "5", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["x"].shape == (50, 2) and saved["nfe"] == 20
    assert "NFE 20" in capsys.readouterr().out


def test_likelihood_exact_and_hutchinson_agree(model_file, tmp_path, capsys):
    args = ["likelihood", "--model", str(model_file), "--n", "20", "--solver", "rk4",
            "--steps", "8"]
    assert main(args + ["--out", str(tmp_path / "exact.csv")]) == 0
    assert main(args + ["--divergence", "hutchinson", "--probes", "64",
                        "--out", str(tmp_path / "hutch.csv")]) == 0
    exact = [float(r) for r in (tmp_path / "exact.csv").read_text().split()[1:]]
    printed = capsys.readouterr().out.split("\n")[1]  # the exact run's bits/dim line
    bpd = -sum(exact) / len(exact) / (2 * math.log(2))  # -log p / (D ln 2), D = 2
    assert printed.startswith(f"= {bpd:.4f} bits/dim (D = 2"), printed
    rows = [r.split(",") for r in (tmp_path / "hutch.csv").read_text().split()[1:]]
    for e, (h, se) in zip(exact, rows, strict=True):
        assert abs(e - float(h)) < 5 * float(se) + 1e-9


def test_transfer_prints_each_scheduler(model_file, capsys):
    assert main(["transfer", "--model", str(model_file), "--n", "100", "--steps", "2",
                 "--target", "cosine"]) == 0
    out = capsys.readouterr().out
    assert "condot" in out and "cosine" in out


def test_errors_never_overwrite_and_name_the_problem(model_file, tmp_path, capsys):
    before = model_file.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "1", "--out", str(model_file)])
    assert exc.value.code == 2 and model_file.read_bytes() == before
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "missing.pt")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "junk.pt")])
    assert "not a flowsolve model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(model_file), "--solver", "rk5"])
    assert main(["sample", "--model", str(model_file), "--solver", "dopri5", "--rtol", "-1"]) == 2


def test_bad_devices_and_outputs_are_refused_before_any_work(model_file, tmp_path, capsys):
    for device, says in [("foo", "not a device"), ("cuda:99", "CUDA"), ("tpu", "not a device")]:
        with pytest.raises(SystemExit) as exc:
            main(["sample", "--model", str(model_file), "--device", device])
        assert exc.value.code == 2 and says in capsys.readouterr().err
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    for out, says in [(blocker / "sub" / "m.pt", "cannot write"), (tmp_path, "is a folder")]:
        with pytest.raises(SystemExit):
            main(["train", "--steps", "1", "--out", str(out)])
        assert says in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_outputs_use_a_private_temporary_file(model_file, tmp_path, capsys):
    # a file named like a fixed temporary name is a user's file: it is never touched
    out = tmp_path / "s.pt"
    theirs = tmp_path / "s.pt.tmp"
    theirs.write_text("precious")
    assert main(["sample", "--model", str(model_file), "--n", "5", "--steps", "2",
                 "--out", str(out)]) == 0
    assert theirs.read_text() == "precious"
    assert torch.load(out, weights_only=True)["x"].shape == (5, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt", "s.pt.tmp"]


def test_a_result_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    from flowsolve._core.files import write_atomically

    target = tmp_path / "result.csv"

    def write(file):
        target.write_text("written by someone else meanwhile")
        file.write(b"our result")

    with pytest.raises(FileExistsError, match="left as it is, and the result is in") as exc:
        write_atomically(target, write, overwrite=False)
    assert target.read_text() == "written by someone else meanwhile"
    kept = str(exc.value).rsplit(" ", 1)[-1]
    assert open(kept, "rb").read() == b"our result"  # nothing lost on either side
    write_atomically(target, lambda f: f.write(b"forced"), overwrite=True)
    assert target.read_bytes() == b"forced"


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes its file 0o600; the written file must instead get what open() gives:
    0o666 less the umask when new, the replaced file's own mode when replacing."""
    import stat

    from flowsolve._core.files import save_atomically, write_atomically
    from flowsolve.studies.results import _atomic_write

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o002)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        assert mode(tmp_path / "plain") == 0o664  # the reference: a plain open
        save_atomically({"a": 1}, tmp_path / "c.pt")
        write_atomically(tmp_path / "new.csv", lambda f: f.write(b"x"), overwrite=False)
        _atomic_write(tmp_path / "study.json", b"{}")
        for name in ("c.pt", "new.csv", "study.json"):
            assert mode(tmp_path / name) == 0o664, name
        os.umask(0o027)
        write_atomically(tmp_path / "other.csv", lambda f: f.write(b"x"))
        assert mode(tmp_path / "other.csv") == 0o640
        # replacing a file keeps its mode, whatever the umask (as open(path, "w") does)
        existing = tmp_path / "existing.csv"
        existing.write_text("old\n")
        os.chmod(existing, 0o644)
        write_atomically(existing, lambda f: f.write(b"new\n"))
        assert existing.read_bytes() == b"new\n" and mode(existing) == 0o644
        os.chmod(existing, 0o600)
        save_atomically({"b": 2}, existing)
        assert mode(existing) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left
        "c.pt", "existing.csv", "new.csv", "other.csv", "plain", "study.json"]


def test_a_failed_study_leaves_no_empty_report_folder(model_file, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "--model", str(model_file), "--solvers", "rk5",
                 "--out", str(out)]) == 2
    assert "rk5" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["compare", "--model", str(model_file), "--budget-steps", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["compare", "--model", str(model_file), "--tolerances", "-1", "--out", str(out)])
    assert not out.exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "--model", str(model_file), "--force", "--n", "8",
                 "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_likelihood_of_one_point_has_no_standard_error(model_file, capsys):
    assert main(["likelihood", "--model", str(model_file), "--n", "1", "--solver", "rk4",
                 "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "no standard error" in out and "nan" not in out


_COMPARE = ["--n", "8", "--solvers", "euler", "--budget-steps", "2", "4", "--repeats", "1"]


def test_compare_into_a_reused_folder_removes_a_stale_plot_it_cannot_redraw(
        model_file, tmp_path, capsys, monkeypatch):
    """--force into a folder of an earlier study: with matplotlib missing, that study's plot
    must not stay beside the new study.csv / study.json (only study.png is removed)."""
    import json
    import sys

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.png").write_bytes(b"the plot of an earlier study")
    (out / "notes.txt").write_text("mine")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib... -> ImportError
    assert main(["compare", "--model", str(model_file), *_COMPARE, "--out", str(out),
                 "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "study.csv", "study.json"]
    said = capsys.readouterr().out
    assert "matplotlib not installed: no plot; removed the earlier run's" in said
    assert (out / "notes.txt").read_text() == "mine"
    records = json.loads((out / "study.json").read_text())["records"]
    assert [(r["solver"], r["budget"]) for r in records] == [("euler", 2), ("euler", 4)]
    # a fresh folder has no earlier plot: nothing to remove, nothing said about it
    assert main(["compare", "--model", str(model_file), *_COMPARE,
                 "--out", str(tmp_path / "fresh")]) == 0
    said = capsys.readouterr().out
    assert "no plot; pip install" in said and "removed" not in said


def test_compare_pins_intra_op_threads_records_them_and_restores_them(model_file, tmp_path,
                                                                        capsys):
    """Like demo, compare times with one thread by default (--threads): more threads made
    small-tensor evaluations up to 1000x slower on a shared CPU. The count is recorded in
    study.json, and the caller's setting is restored when main() returns."""
    import json

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for extra, expected in [([], 1), (["--threads", "2"], 2)]:
            out = tmp_path / f"threads{expected}"
            assert main(["compare", "--model", str(model_file), *_COMPARE, *extra,
                         "--out", str(out)]) == 0
            assert json.loads((out / "study.json").read_text())["meta"]["threads"] == expected
            assert torch.get_num_threads() == 3
        assert main(["demo", "--closed-form", "--threads", "2"]) == 0  # pinned in main() too
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["compare", "--model", str(model_file), "--threads", "0"])
    assert "--threads must be >= 1; got 0" in capsys.readouterr().err
