"""Test setup: 4 simulated CPU devices and full float32 matmul precision for every test.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time.
Single-device checks build their mesh from `jax.devices()[:1]`.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
