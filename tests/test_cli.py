"""The flowsolve command: a tiny train -> sample -> likelihood -> transfer round, and errors."""

import pytest
import torch

from flowsolve.cli import main


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
