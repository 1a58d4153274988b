"""Multi-process training on localhost, preemption and corrupt checkpoints.

Two processes with two CPU devices each run JAX's multi-controller runtime
(``jax.distributed`` with a local coordinator and gloo collectives) through
``train.py``: the code path of a multi-host GPU or TPU job.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker

from tests.helpers import (ROOT, saved_params, subprocess_env, tiny_config,
                           tiny_train_flags)
from tversky_jax import train_lib



def two_process_job(tiny_dataset, workdir, tmp_path, **overrides):
  port = portpicker.pick_unused_port()
  flags = tiny_train_flags(tiny_dataset, workdir, **overrides) + [
      f"--coordinator=localhost:{port}", "--num_processes=2"]
  env = subprocess_env(2)
  processes = []
  for i in range(2):
    log = open(tmp_path / f"process{i}.log", "w")
    processes.append(subprocess.Popen(
        [sys.executable, "train.py", *flags, f"--process_id={i}"], cwd=ROOT,
        env=env, stdout=log, stderr=subprocess.STDOUT))
  return processes


def wait_all(processes, tmp_path, timeout=400):
  deadline = time.time() + timeout
  codes = [p.wait(timeout=max(1, deadline - time.time())) for p in processes]
  logs = [open(tmp_path / f"process{i}.log").read() for i in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + "\n-----\n" + logs[1][-3000:]
  return logs


def test_two_processes_equal_one_process_and_stop_together_on_sigterm(
    tiny_dataset, straight_run, tmp_path):
  """Two processes train exactly as one process with four devices; then,
  resumed for many more steps, a SIGTERM to one of them stops both at the
  same step with a checkpoint. (One test: both jobs share the compilation
  of the two-process step.)"""
  workdir = tmp_path / "run"
  logs = wait_all(two_process_job(tiny_dataset, workdir, tmp_path), tmp_path)
  assert "Done: 6 steps" in logs[0]
  assert "Done: 6 steps" not in logs[1]  # only process 0 reports
  assert saved_params(str(workdir), tiny_config(tiny_dataset))[0] == 6
  # The same losses as one process (the tolerance and why parameters are
  # not compared: test_train.py, test_data_parallel_run_follows_the_
  # single_device_losses).
  metrics = workdir / "metrics.jsonl"
  losses = [json.loads(line)["train/loss"]
            for line in metrics.read_text().splitlines()]
  np.testing.assert_allclose(losses, straight_run.losses, rtol=1e-3)

  logged = metrics.read_text().count("\n")
  processes = two_process_job(tiny_dataset, workdir, tmp_path,
                              **{"train.num_steps": 400,
                                 "train.checkpoint_every": 0})
  deadline = time.time() + 300
  while metrics.read_text().count("\n") <= logged:  # a step after resuming
    assert time.time() < deadline
    assert all(p.poll() is None for p in processes), (
        open(tmp_path / "process0.log").read()[-3000:])
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  logs = wait_all(processes, tmp_path)
  assert "Resumed from the checkpoint of step 6" in logs[0]
  assert "all processes stop at step" in logs[0]
  step, params = saved_params(
      str(workdir), tiny_config(tiny_dataset, **{"train.num_steps": 400}))
  assert 6 < step < 400
  assert f"Stopped at step {step}" in logs[0]
  assert all(np.all(np.isfinite(p)) for p in params)


def test_truncated_newest_checkpoint_falls_back_to_previous(tiny_dataset,
                                                            tmp_path, capsys):
  config = tiny_config(tiny_dataset, **{"train.num_steps": 4})
  train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  # The arrays live in OCDBT data files (``d/`` folders). Not every one of
  # them is read on restore (which file holds what varies between runs), so
  # truncating only the largest one did not always break the checkpoint:
  # truncate them all.
  newest = tmp_path / "checkpoints" / "4" / "state"
  data_files = [p for p in newest.rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 3)
  config.train.num_steps = 6
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  output = "".join(capsys.readouterr())
  assert "checkpoint of step 4" in output and "unreadable" in output
  assert "Resumed from the checkpoint of step 2" in output
  assert summary.step == 6 and not summary.interrupted
  assert saved_params(str(tmp_path), config)[0] == 6
