"""When ``parallel.initialize_distributed`` starts JAX's distributed runtime.

The environments are set with monkeypatch; no test starts a distributed
runtime in the pytest process (``jax.distributed.initialize`` is replaced).
The one subprocess test lets a real start wait for a peer that never comes.
"""

import os
import socket
import subprocess
import sys
import threading

import jax
import pytest

from tversky_jax import parallel
from tests import helpers

# What srun sets for task 1 of a 4-task step (the variables that matter here).
_SRUN_STEP = {"SLURM_JOB_ID": "123", "SLURM_NTASKS": "4",
              "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
              "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "1"}
# A shell of `salloc -n 4`, and the batch script of `sbatch -n 4` (which runs
# as task 0 of the one-task batch step, without srun's step variables).
_SALLOC = {"SLURM_JOB_ID": "123", "SLURM_NTASKS": "4",
           "SLURM_NODELIST": "node[01-02]"}
_SBATCH_SCRIPT = dict(_SALLOC, SLURM_PROCID="0", SLURM_LOCALID="0",
                      SLURM_NODEID="0")
# salloc with LaunchParameters=use_interactive_step: the shell is a one-task
# step started with --preserve-env, so SLURM_NTASKS stays the allocation's.
_INTERACTIVE_STEP = dict(_SALLOC, SLURM_STEP_ID="4294967290",
                         SLURM_STEP_NUM_TASKS="1",
                         SLURM_STEP_NODELIST="node01", SLURM_PROCID="0",
                         SLURM_LOCALID="0")


@pytest.fixture
def environ(monkeypatch):
  """Clears every launcher variable; returns a function that sets some."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_")) or name in (
        "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
      monkeypatch.delenv(name)

  def set_variables(variables):
    for name, value in variables.items():
      monkeypatch.setenv(name, value)
  return set_variables


@pytest.fixture
def fake_initialize(monkeypatch):
  """Replaces jax.distributed.initialize; returns the list of its kwargs."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  return calls


@pytest.mark.parametrize("variables", [_SALLOC, _SBATCH_SCRIPT,
                                       _INTERACTIVE_STEP],
                         ids=["salloc", "sbatch_script", "interactive_step"])
def test_allocation_without_a_multi_task_step_is_no_cluster_job(
    environ, variables):
  environ(variables)
  assert not parallel.cluster_job_detected()


def test_srun_step_of_several_tasks_is_a_cluster_job(environ):
  environ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1",
           "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"})
  assert parallel.cluster_job_detected()


def test_auto_in_salloc_shell_runs_alone_and_says_srun_is_needed(
    environ, monkeypatch, capsys):
  environ(_SALLOC)

  def initialize(**kwargs):
    raise AssertionError(f"jax.distributed.initialize called: {kwargs}")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  assert parallel.initialize_distributed("auto") is False
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1, err
  assert "SLURM_NTASKS=4" in err and "srun python train.py" in err


def test_start_in_srun_step_says_what_it_waits_for_with_a_finite_timeout(
    environ, fake_initialize, capsys):
  environ(_SRUN_STEP)
  assert parallel.initialize_distributed("auto", initialization_timeout=300)
  [kwargs] = fake_initialize
  # JAX's own deadline comes after ours, so that ours reports the failure.
  assert 300 < kwargs["initialization_timeout"] < 400
  err = capsys.readouterr().err
  assert err.splitlines() == [
      "Starting JAX's distributed runtime: process 1 of 4 (SLURM step), "
      "waiting up to 300 s for the others at the address JAX derives from "
      "the environment..."], err


def test_start_that_times_out_is_a_one_line_error(environ, monkeypatch):
  environ({})
  aborted = threading.Event()
  messages = []

  def abort(message):
    messages.append(message)
    aborted.set()
  monkeypatch.setattr(parallel, "_abort", abort)
  # Stands for a start blocked in C++ waiting for peers.
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: aborted.wait(10))
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  parallel.initialize_distributed(
      "on", coordinator_address="host0:1234", num_processes=3, process_id=2,
      initialization_timeout=0.2)
  assert aborted.is_set()
  [message] = messages
  assert "\n" not in message
  assert message.startswith(
      "error: JAX's distributed runtime did not start within 0.2 s: "
      "process 2 of 3 waited for the others at host0:1234"), message


def test_real_start_without_peers_ends_with_the_one_line_error():
  with socket.socket() as free:
    free.bind(("localhost", 0))
    port = free.getsockname()[1]
  code = ("from tversky_jax import parallel\n"
          "parallel.initialize_distributed('on', coordinator_address="
          f"'localhost:{port}', num_processes=2, process_id=1, "
          "initialization_timeout=2)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT,
                          env=helpers.subprocess_env(devices=1),
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 1, result.stderr
  # JAX's C++ runtime may log connection retries in between on some
  # versions; what counts: our start line, our error line last, no trace.
  lines = result.stderr.splitlines()
  assert lines[0].startswith("Starting JAX's distributed runtime: process 1 "
                             f"of 2, waiting up to 2 s"), result.stderr
  assert lines[-1].startswith("error: JAX's distributed runtime did not "
                              "start within 2 s"), result.stderr
  assert "Traceback" not in result.stderr, result.stderr
