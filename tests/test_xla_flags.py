"""The test setup's XLA flags cannot abort the interpreter."""

from tests import conftest


def test_a_flag_this_xla_does_not_know_is_not_set():
  # XLA aborts a process whose XLA_FLAGS holds an unknown flag (jaxlib 0.12
  # dropped one the suite used); the probe runs it in a subprocess.
  assert not conftest._xla_accepts("--xla_tversky_jax_no_such_flag=true")
  assert conftest._xla_accepts("--xla_force_host_platform_device_count=2")
