"""configurator.py's messages, called as a script calls it."""

import os
import sys

import pytest

import configurator
from conftest import REPO


def settings(argv, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["distill.py", *argv])
    g = {"__file__": os.path.join(REPO, "distill.py"), "batch_size": 8, "learning_rate": 6e-4,
         "out_dir": "out"}
    return configurator.configure(g)


def test_a_missing_config_file_names_each_folder_once(monkeypatch, tmp_path):
    for cwd, folders in ((REPO, f"(looked in {REPO})"),
                         (tmp_path, f"(looked in {tmp_path} and {REPO})")):
        with pytest.raises(SystemExit) as e:
            settings(["config/t5.py"], cwd, monkeypatch)
        want = f"distill.py: error: no config file config/t5.py {folders}"
        assert str(e.value).startswith(want), e.value
        assert "did you mean config/t4.py?" in str(e.value)


def test_a_and_an(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="batch_size takes an int \\(default 8\\), got 'x'"):
        settings(["--batch_size=x"], tmp_path, monkeypatch)
    with pytest.raises(SystemExit,
                       match="learning_rate takes a float \\(default 0.0006\\), got 'x'"):
        settings(["--learning_rate=x"], tmp_path, monkeypatch)
    assert settings(["--learning_rate=1"], tmp_path, monkeypatch)["learning_rate"] == 1.0


def test_key_space_value_and_bare_flags(monkeypatch, tmp_path):
    """--key value as argparse takes it, a bare --flag for a True/False setting, and --key without a
    value refused in one line."""
    monkeypatch.chdir(tmp_path)
    g = {"__file__": os.path.join(REPO, "distill.py"), "batch_size": 8, "compile": False,
         "teacher": "x", "runs": ""}
    got = configurator.configure(dict(g), ["--batch_size", "4", "--compile", "--teacher", "None"])
    assert (got["batch_size"], got["compile"], got["teacher"]) == (4, True, None)
    assert configurator.configure(dict(g), ["--compile", "False"])["compile"] is False
    with pytest.raises(SystemExit, match="--batch_size: give it a value, as --batch_size=VALUE"):
        configurator.configure(dict(g), ["--batch_size"])
    got = configurator.configure(dict(g), ["a", "--batch_size=2", "b"], plain="runs")
    assert got["runs"] == "a,b"


def test_a_plain_argument_that_is_not_a_config_file(monkeypatch, tmp_path):
    """--t1 a.json b.json: b.json is neither a setting nor a config file; it used to be run as
    Python (a JSON object is a valid expression) and silently dropped."""
    (tmp_path / "b.json").write_text('{"students": {}}')
    with pytest.raises(SystemExit, match="b.json: a config file is a .py file; give a setting as"):
        settings(["--out_dir", "a", "b.json"], tmp_path, monkeypatch)
