"""Test setup: four simulated CPU devices, so multi-device code is exercised.

XLA reads the flag when the backend starts, so it must be set before jax
initialises; pytest imports this file before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
