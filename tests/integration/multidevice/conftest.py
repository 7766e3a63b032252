import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  if jax.device_count() != 8:
    pytest.fail(f"run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                f"(tests/test_multidevice.py does); found {jax.device_count()} devices")
