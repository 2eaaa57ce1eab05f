"""The version floor of requirements.txt is the one the code checks."""

import os
import re
import sys

import pytest
import torch

import common
from conftest import REPO


def test_torch_below_the_floor_is_one_line(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    monkeypatch.setattr(sys, "argv", ["distill.py"])
    with pytest.raises(SystemExit) as e:
        common.check_torch()
    assert str(e.value) == ("distill.py: error: torch 2.9.1+cu128 is installed; this code needs "
                            "torch >= 2.10 (pip install 'torch>=2.10')")
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    common.check_torch()


def test_requirements_state_the_floor():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        text = f.read()
    floor = re.search(r"^torch>=(\d+)\.(\d+)", text, re.M)
    assert floor and tuple(map(int, floor.groups())) == common.TORCH_FLOOR
    assert re.search(r"^transformers>=5", text, re.M)
