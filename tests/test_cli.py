"""The CLI as users type it: help, options, errors (exact message + exit code), a full run."""
import json
import subprocess
import sys

from typer.testing import CliRunner

from cli.main import app

from .helpers import make_imagefolder

runner = CliRunner()


def test_cli_startup_imports_no_torch_or_timm():
    code = "import sys, cli.main; bad = [m for m in ('torch', 'timm', 'pandas', 'sklearn') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_help_documents_every_option():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--manifest", "--out", "--model", "--pretrained", "--epochs", "--batch-size", "--optimizer",
                "--lr", "--weight-decay", "--schedule", "--seed", "--device", "--params"):
        assert opt in res.output, opt
    assert "(params: train.epochs)" in res.output  # each option names the params.yaml key it overrides


def test_bad_param_value_is_one_clear_line(tmp_path):
    res = runner.invoke(app, ["train", "--optimizer", "rmsprop", "--params", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2
    assert "command-line options: train.optimizer = 'rmsprop' is not allowed; use one of: sgd, adam, adamw" in res.output
    assert "Traceback" not in res.output


def test_unknown_params_key_names_the_fix(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epoch: 3\n")
    res = runner.invoke(app, ["train", "--params", str(p)])
    assert res.exit_code == 2
    assert f"{p}: unknown key 'train.epoch'; did you mean 'train.epochs'?" in " ".join(res.output.split())


def test_missing_manifest(tmp_path):
    res = runner.invoke(app, ["train", "--manifest", str(tmp_path / "nope.csv"), "--params", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2
    assert "manifest not found" in res.output and "clean prepare" in res.output


def test_prepare_train_evaluate_on_a_folder(tmp_path, monkeypatch):
    make_imagefolder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: imagefolder\n  root: imgs\n  val_frac: 0.2\n  test_frac: 0.2\n"
        "train:\n  epochs: 2\n  batch_size: 8\n  device: cpu\n")
    res = runner.invoke(app, ["prepare"])
    assert res.exit_code == 0, res.output
    assert "0 problem file(s)" in res.output
    res = runner.invoke(app, ["train", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "models/base/metrics.json").read_text())["epochs"] == 3  # option beat params.yaml
    res = runner.invoke(app, ["evaluate", "--name", "base"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "plots/evaluate_base.json").read_text())  # the details beside the flat metrics
    assert "accuracy" in res.output and m["n"] == 7  # 36 images: test = round(0.2*36)
