"""Threads on a shared CPU: passive OpenMP waiting from the first import, and each job of a CPU
multirun its share of the cores (never more threads in all than cores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from esm_steer import launch
from esm_steer.config import ESMConfig

VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.setenv(var, "")  # records the original value: restored after the test
        monkeypatch.delenv(var)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_cores,jobs,share", [(2, 2, 1), (16, 4, 4), (16, 3, 5), (2, 5, 1)])
def test_each_cpu_job_gets_its_share_of_the_cores(monkeypatch, clean_env, n_cores, jobs, share):
    monkeypatch.setattr(launch, "cores", lambda: n_cores)
    cfg = OmegaConf.structured(ESMConfig)
    assert launch.share_cores(jobs, cfg) == share
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(share)
    assert torch.get_num_threads() == share and cfg.model.num_threads == share
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_an_explicit_model_num_threads_is_kept(monkeypatch, clean_env):
    monkeypatch.setattr(launch, "cores", lambda: 8)
    cfg = OmegaConf.structured(ESMConfig)
    cfg.model.num_threads = 3
    launch.share_cores(2, cfg)
    assert cfg.model.num_threads == 3


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_the_package_sets_passive_waiting_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    code = "import esm_steer, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
