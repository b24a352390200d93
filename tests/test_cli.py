"""The flowsolve command: a tiny train -> sample -> likelihood -> transfer round, and errors."""

import argparse
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import flowsolve
from flowsolve._core.files import load_checked_file, save_checked
from flowsolve.cli.main import build_parser, main


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


def test_likelihood_with_a_step_size_a_point(model_file, tmp_path, capsys):
    """--step-control per_sample: each point's log p and NFE as log_likelihood gives them for
    that point alone; a solver without an embedded FSAL pair is refused."""
    out = tmp_path / "ps.csv"
    assert main(["likelihood", "--model", str(model_file), "--n", "12", "--rtol", "1e-6",
                 "--atol", "1e-6", "--step-control", "per_sample", "--out", str(out)]) == 0
    assert "NFE per point (step size a point): median" in capsys.readouterr().out
    header, *rows = out.read_text().split()
    assert header == "log_prob,nfe"
    model, _ = flowsolve.cli.common.load_model(str(model_file), "cpu")
    net = model.double()
    x = flowsolve.training.data.sample_dataset(
        "moons", 12, generator=flowsolve.cli.common.seeded_generator(0)).double()
    for i in (0, 7):
        alone = flowsolve.log_likelihood(lambda z, t: net(z, t), x[i:i + 1], rtol=1e-6,
                                         atol=1e-6)
        lp, nfe = rows[i].split(",")
        assert abs(float(lp) - alone.log_prob.item()) < 1e-8 and int(nfe) == alone.nfe
    with pytest.raises(SystemExit):
        main(["likelihood", "--model", str(model_file), "--solver", "RK45",
              "--step-control", "per_sample"])
    assert "--step-control per_sample runs dopri8, dopri5, bosh3" in capsys.readouterr().err


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
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(model_file), "--solver", "dopri5", "--rtol", "-1"])
    assert exc.value.code == 2 and "--rtol must be a number in (0, 1); got -1" in \
        capsys.readouterr().err


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png", "s.pt", "s.pt.tmp"]


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


def test_a_failed_study_leaves_no_empty_report_folder(model_file, tmp_path, capsys,
                                                       monkeypatch):
    import flowsolve.studies.compare

    def fail(*args, **kwargs):
        raise ValueError("the study failed")

    out = tmp_path / "study"
    with monkeypatch.context() as m:
        m.setattr(flowsolve.studies.compare, "compare_solvers", fail)
        assert main(["compare", "--model", str(model_file), "--out", str(out)]) == 2
    assert "the study failed" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):  # an unknown solver: refused before the folder is made
        main(["compare", "--model", str(model_file), "--solvers", "rk5", "--out", str(out)])
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


# -- help, version, start-up -------------------------------------------------------------------
def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def test_every_option_has_help_that_shows_its_default():
    commands = _commands()
    assert sorted(commands) == ["compare", "demo", "likelihood", "sample", "train", "transfer"]
    for name, parser in commands.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            formatter = parser.formatter_class(prog=f"flowsolve {name}")
            formatter.add_argument(action)
            text = " ".join(formatter.format_help().split())  # as --help prints it, unwrapped
            flag = action.option_strings[-1]
            assert action.help and action.help.strip(), f"{name} {flag}: no help"
            if action.required or isinstance(action.default, bool):
                continue
            if action.default is None:  # no value: the text says what happens without one
                assert "(default: " in text, f"{name} {flag}: {text}"
            else:
                assert f"(default: {_shown(action.default)})" in text, f"{name} {flag}: {text}"
    sample = " ".join(commands["sample"].format_help().split())
    assert "--steps STEPS steps of a fixed-step solver" in sample and "(default: 20)" in sample
    compare = " ".join(commands["compare"].format_help().split())
    assert "(default: euler midpoint rk4 dopri5)" in compare
    for flag in ("--lr", "--sigma", "--n"):
        assert flag in " ".join(commands["train" if flag != "--n" else "sample"].format_help()
                                .split())


def test_help_is_plain_text_and_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"flowsolve {flowsolve.__version__}\n"
    texts = [build_parser().format_help(), *(p.format_help() for p in _commands().values())]
    for text in texts:
        assert "`" not in text and not re.search(r":(func|class|mod|meth|data|attr):", text)
    top = texts[0]
    assert top.split("\n")[2].startswith("flowsolve: the dynamics of flow-matching")
    assert "NAME-2, NAME-3" in top and "--version" in top


def test_help_and_version_start_without_torch():
    """`flowsolve --help` / `--version` took about 5 s (torch, POT, scikit-learn imported by
    the package's front door); they now import no torch, and the flat names load on use."""
    code = textwrap.dedent("""
        import sys
        import flowsolve
        assert "torch" not in sys.modules, "import flowsolve imported torch"
        from flowsolve.cli.main import main
        for argv in (["--help"], ["--version"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0
        assert "torch" not in sys.modules, "flowsolve --help imported torch"
        assert set(flowsolve.__all__) <= set(dir(flowsolve))
        from flowsolve import *  # every name of __all__
        assert sample is flowsolve.ode.solve.sample and flowsolve.ode.solve.ODE_SOLVERS
        import flowsolve.analytic as a
        assert a is flowsolve.truth.analytic and a.__spec__.name == "flowsolve.truth.analytic"
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: flowsolve" in done.stdout and flowsolve.__version__ in done.stdout


# -- options that would be ignored, messages in the words of the command line ------------------
@pytest.mark.parametrize("argv, says", [
    (["sample", "--solver", "dopri5", "--steps", "5"], "--steps sets the steps of a fixed-step"),
    (["sample", "--solver", "rk4", "--atol", "1e-3"], "--atol is a tolerance of an adaptive"),
    (["sample", "--force"], "no --out is given"),
    (["sample", "--solver", "dopri5", "--rtol", "2"], "--rtol must be a number in (0, 1)"),
    (["likelihood", "--probes", "4"], "--probes sets the number of Hutchinson probes"),
    (["likelihood", "--divergence", "hutchinson", "--probes", "1"], "needs two probes"),
    (["transfer", "--target", "ve"], "starts from N(0, 50^2 I)"),
    (["transfer", "--out", "figure.jpg"], "written as .png, .pdf, .svg"),
    (["compare", "--solvers", "dopri5", "--budget-steps", "4"], "--solvers dopri5 has none"),
    (["compare", "--solvers", "euler", "--tolerances", "1e-3"], "--solvers euler has none"),
    (["compare", "--solvers", "rk4", "rk4"], "--solvers names rk4 more than once"),
    (["compare", "--tolerances", "1e-11"], "--tolerances must lie in (1e-10, 1)"),
    (["compare", "--tolerances", "1e-10"], "--tolerances must lie in (1e-10, 1)"),
    (["compare", "--grid", "cosine"], "--grid cosine: not a grid name, a number or a file; "
                                      "accepted: uniform, logsnr, edm, a shift s > 0"),
    (["compare", "--grid", "opt.json"], "(no such file: opt.json)"),
    (["compare", "--grid", "-1"], "must be a finite number > 0"),
    (["compare", "--grid", "nan"], "must be a finite number > 0"),
    (["compare", "--grid", "logsnr", "--grid", "logsnr"], "--grid names logsnr more than once"),
    (["compare", "--solvers", "dopri5", "--grid", "edm"], "--solvers dopri5 has none"),
    (["compare", "--solvers", "rk4,rk5"], "invalid choice: 'rk4,rk5'"),
    (["compare", "--solvers", "rk4,rk4"], "--solvers names rk4 more than once"),
])
def test_options_that_would_be_ignored_are_refused(model_file, tmp_path, monkeypatch, capsys,
                                                   argv, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([argv[0], "--model", str(model_file), *argv[1:]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize("argv, says", [
    (["train", "--method", "cfm", "--sigma", "0.2"], "--method cfm has none"),
    (["train", "--method", "sbcfm", "--sigma", "0"], "--method sbcfm needs --sigma > 0"),
    (["train", "--sigma", "-1"], "--sigma must be a number >= 0"),
    (["train", "--lr", "0"], "--lr must be a number > 0"),
    (["demo", "--closed-form", "--steps", "5"], "--steps would be ignored"),
    (["demo", "--closed-form", "--force"], "--force would be ignored"),
    (["demo", "--scheduler", "cosine"], "--scheduler chooses the path of --closed-form"),
])
def test_training_and_demo_options_that_would_be_ignored_are_refused(tmp_path, capsys, argv,
                                                                     says):
    out = ["--out", str(tmp_path / "m.pt")] if argv[0] == "train" else []
    with pytest.raises(SystemExit) as exc:
        main([*argv, *out])
    assert exc.value.code == 2 and says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_defaults_of_refusable_options_are_not_refused(model_file, capsys):
    """Only options given are refused: an adaptive solver with the default --steps, and the
    default --sigma of `train --method cfm` (the model file records sigma 0: no noise)."""
    assert main(["sample", "--model", str(model_file), "--n", "5", "--solver", "dopri5",
                 "--rtol", "1e-4"]) == 0
    assert main(["likelihood", "--model", str(model_file), "--n", "2", "--solver", "rk4",
                 "--steps", "2", "--divergence", "hutchinson"]) == 0
    assert load_checked_file(model_file, "model")["trained"]["sigma"] == 0.0


def test_library_messages_name_the_options_of_the_command_line(model_file, tmp_path, capsys):
    # float32 samples cannot resolve rtol = atol = 1e-8: the library names rtol= / atol=
    assert main(["sample", "--model", str(model_file), "--n", "5", "--solver", "dopri5",
                 "--rtol", "1e-8", "--atol", "1e-8"]) == 2
    err = capsys.readouterr().err
    assert "--rtol 1e-08 and --atol 1e-08 are below what torch.float32" in err, err
    assert "rtol=" not in err and "atol=" not in err and "----" not in err
    # a solve that cannot finish: what to change here, not a traceback naming max_steps=
    saved = load_checked_file(model_file, "model")
    saved["state_dict"] = {k: torch.full_like(v, math.nan)
                           for k, v in saved["state_dict"].items()}
    save_checked(saved, tmp_path / "nan.pt")
    assert main(["sample", "--model", str(tmp_path / "nan.pt"), "--n", "5"]) == 1
    err = capsys.readouterr().err
    assert "solver rk4 stopped at t=0 (non_finite)" in err and "more --steps" in err, err


# -- transfer: every CondOT-path model, a figure -------------------------------------------------
def _retrained(model_file, tmp_path, **trained):
    """``model_file``'s weights recorded as trained otherwise (the check reads the record)."""
    saved = load_checked_file(model_file, "model")
    saved["trained"].update(trained)
    path = tmp_path / f"{trained['method']}-{trained['sigma']}.pt"
    save_checked(saved, path)
    return path


def test_transfer_takes_ot_coupled_models_without_bridge_noise(tmp_path, capsys):
    """Transfer is exact for a velocity of the CondOT path under any coupling of the endpoints:
    an OT-CFM model trained with --sigma 0 is accepted, and --out draws the figure."""
    model = tmp_path / "ot.pt"
    assert main(["train", "--data", "moons", "--method", "otcfm", "--sigma", "0", "--steps",
                 "5", "--batch-size", "32", "--hidden", "16", "--depth", "1",
                 "--out", str(model)]) == 0
    figure = tmp_path / "transfer.png"
    assert main(["transfer", "--model", str(model), "--n", "64", "--steps", "2",
                 "--target", "cosine", "condot", "cosine", "--out", str(figure)]) == 0
    out = capsys.readouterr().out
    assert out.count("condot ") == 1 and out.count("cosine ") == 1  # each scheduler once
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {figure}" in out
    with pytest.raises(SystemExit):  # a figure is never overwritten without --force
        main(["transfer", "--model", str(model), "--n", "8", "--out", str(figure)])
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("method, sigma, says", [
    ("otcfm", 0.1, "a bridge with Gaussian noise of std 0.1"),
    ("icfm", 0.5, "a bridge with Gaussian noise of std 0.5"),
    ("sbcfm", 1.0, "a Brownian bridge"),
])
def test_transfer_refuses_models_trained_with_bridge_noise(model_file, tmp_path, capsys,
                                                           method, sigma, says):
    path = _retrained(model_file, tmp_path, method=method, sigma=sigma)
    with pytest.raises(SystemExit) as exc:
        main(["transfer", "--model", str(path), "--n", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err and "--sigma 0" in err, err
    # the same weights recorded as sigma = 0 (I-CFM / OT-CFM on the CondOT path): accepted
    if method != "sbcfm":
        ok = _retrained(model_file, tmp_path, method=method, sigma=0.0)
        assert main(["transfer", "--model", str(ok), "--n", "8", "--steps", "1"]) == 0


def test_transfer_out_without_matplotlib_is_refused_before_any_work(model_file, tmp_path,
                                                                     capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit):
        main(["transfer", "--model", str(model_file), "--out", str(tmp_path / "t.png")])
    assert "needs matplotlib" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# -- sample --out: the .pt, a CSV and a plot ------------------------------------------------------
def test_sample_out_writes_a_csv_and_a_plot_beside_the_pt_file(model_file, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "s.pt"
    assert main(["sample", "--model", str(model_file), "--n", "7", "--steps", "2",
                 "--out", str(out)]) == 0
    x = torch.load(out, weights_only=True)["x"]
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "x,y" and len(rows) == 8
    torch.testing.assert_close(torch.tensor([[float(v) for v in r.split(",")] for r in rows[1:]]),
                               x, rtol=1e-7, atol=1e-7)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
    # the files beside it are checked like --out itself, before any work
    (tmp_path / "t.png").write_text("mine")
    for bad, says in [(tmp_path / "t.pt", "t.png exists"), (tmp_path / "u.csv", "the .pt file")]:
        with pytest.raises(SystemExit):
            main(["sample", "--model", str(model_file), "--out", str(bad)])
        assert says in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png", "s.pt", "t.png"]
    # without matplotlib: no plot, and with --force the earlier run's plot is removed
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["sample", "--model", str(model_file), "--n", "3", "--steps", "2",
                 "--out", str(out), "--force"]) == 0
    said = capsys.readouterr().out
    assert "matplotlib not installed: no plot; removed the earlier run's" in said
    assert not (tmp_path / "s.png").exists() and len((tmp_path / "s.csv").read_text().split()) == 4


def test_compare_writes_into_a_fresh_numbered_folder_when_out_exists(model_file, tmp_path,
                                                                      capsys):
    """As the README says: an existing --out is never written into without --force."""
    out = tmp_path / "study"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["compare", "--model", str(model_file), *_COMPARE, "--out", str(out)]) == 0
    assert f"wrote {tmp_path / 'study-2'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (tmp_path / "study-2" / "study.json").is_file()


def test_the_readme_command_lines_parse():
    """Every `flowsolve ...` line of the README's command-line block is accepted as written
    (parsed only: the options and their values exist)."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [part.strip() for line in block.splitlines()
             for part in line.split("#", 1)[0].split(";") if part.strip()]
    assert len(lines) >= 7 and any("transfer" in line and "--out" in line for line in lines)
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0].startswith("--") or argv[-1] == "--help":
            continue  # --version, COMMAND --help: they print and exit
        args = parser.parse_args(argv)
        assert args.command == argv[0]


# -- compare: samplers and time grids ----------------------------------------------------------
def _study_records(out) -> list[dict]:
    import json

    return json.loads((out / "study.json").read_text())["records"]


def test_compare_runs_samplers_on_the_grids_of_the_command_line(model_file, tmp_path, capsys):
    """--grid logsnr --solvers dpmpp_2m,heun2: each record is the solve of the model on the
    CondOT path's log-SNR grid (recomputed here from the model file), per (solver, grid)."""
    from flowsolve.ode.grids import time_grid
    from flowsolve.ode.solve import sample

    out = tmp_path / "study"
    assert main(["compare", "--model", str(model_file), "--n", "8", "--grid", "logsnr",
                 "--grid", "3", "--solvers", "dpmpp_2m,heun2", "--budget-steps", "2", "4",
                 "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dpmpp_2m@logsnr  order: declared 2.0" in printed and "heun2@shift3" in printed
    records = _study_records(out)
    assert [(r["solver"], r["grid"], r["budget"]) for r in records] == [
        (s, g, n) for s in ("dpmpp_2m", "heun2") for g in ("logsnr", "shift3") for n in (2, 4)]
    saved = load_checked_file(model_file, "model")
    net = flowsolve.MLP(**saved["arch"]).double()
    net.load_state_dict(saved["state_dict"])
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)).double()  # --seed 0
    path = flowsolve.AffineGaussianPath(flowsolve.CondOTScheduler())
    with torch.no_grad():
        ref = sample(lambda x, t: net(x, t), x0, "DOP853", rtol=1e-10, atol=1e-10).x
        for r in records[:4]:  # dpmpp_2m on both grids
            grid = time_grid({"logsnr": "logsnr", "shift3": 3.0}[r["grid"]], r["budget"],
                             path=path)
            x = sample(lambda x, t: net(x, t), x0, r["solver"], grid=grid, path=path).x
            rms = float((x - ref).norm(dim=1).square().mean().sqrt())
            assert r["error"] == pytest.approx(rms, rel=1e-6), r
    assert records[0]["error"] != records[2]["error"]  # logsnr and shift3: other grids


def test_compare_refuses_samplers_and_logsnr_grids_on_a_bridge_model(model_file, tmp_path,
                                                                     capsys):
    bridge = _retrained(model_file, tmp_path, method="otcfm", sigma=0.1)
    out = tmp_path / "study"
    for extra, says in [(["--solvers", "ddim", "rk4"], "--solvers ddim (samplers"),
                        (["--solvers", "rk4", "--grid", "logsnr"], "--grid logsnr (spaced")]:
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--model", str(bridge), *extra, "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err and "not an affine Gaussian path" in err
        assert "a bridge with Gaussian noise of std 0.1" in err and "--sigma 0" in err, err
        assert not out.exists()  # refused before the report folder is made
    # the same weights recorded as trained on the CondOT path: a sampler is accepted
    ok = _retrained(model_file, tmp_path, method="otcfm", sigma=0.0)
    assert main(["compare", "--model", str(ok), "--n", "4", "--solvers", "ddim",
                 "--budget-steps", "2", "--repeats", "1", "--out", str(out)]) == 0


def test_compare_reads_a_grid_file(model_file, tmp_path, capsys):
    import json

    grid_search = pytest.importorskip("flowsolve.studies.grid_search")
    good, short = tmp_path / "opt3.json", tmp_path / "short.json"
    good.write_text(json.dumps({"format": grid_search.GRID_FORMAT,
                                "grid": [0.0, 0.4, 0.8, 1.0]}))
    short.write_text(json.dumps({"format": grid_search.GRID_FORMAT, "grid": [0.0, 0.5, 0.9]}))
    out = tmp_path / "study"
    assert main(["compare", "--model", str(model_file), "--n", "4", "--solvers", "heun2",
                 "--grid", str(good), "--grid", "uniform", "--budget-steps", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    assert [(r["grid"], r["budget"], r["nfe"]) for r in _study_records(out)] == [
        ("opt3", 3, 6), ("uniform", 2, 4)]
    for argv, says in [(["--grid", str(short)], "must start at t0=0.0 and end at t1=1.0"),
                       (["--grid", str(good), "--budget-steps", "4"],
                        "every --grid is a file whose times fix the steps"),
                       (["--grid", str(tmp_path / "study" / "study.json")],
                        "is not a grid file of format")]:
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--model", str(model_file), *argv,
                  "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err, err
    assert not (tmp_path / "refused").exists()


def test_compare_help_names_the_grids_and_the_samplers():
    text = " ".join(_commands()["compare"].format_help().split())
    samplers = [n for n, i in flowsolve.ODE_SOLVERS.items() if i.needs_path]
    assert f"the low-NFE samplers {', '.join(samplers)} step in the log-SNR" in text
    assert "repeat it to compare grids: uniform, logsnr, edm (" in text
    assert "a number s > 0 (the rectified-flow shift" in text and "(default: uniform)" in text
