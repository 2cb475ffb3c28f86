"""Test setup: 4 simulated CPU devices, the commands' choice of XLA:CPU convolution and matmul
kernels (`jaxdiff.cli.choose_xla_cpu_kernels`) and full float32 matmul precision for every test.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time.
Single-device checks build their mesh from `jax.devices()[:1]`.

Fixtures shared by several test files live here, session-scoped so that they are built once;
their helpers are imported inside the fixtures so that this setup stays the first import.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxdiff import cli  # noqa: E402

cli.choose_xla_cpu_kernels()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def toy_reference():
  """Three single steps of the toy denoiser on one device (test_step.py, test_sharding.py)."""
  import toy_training  # pylint: disable=g-import-not-at-top
  return toy_training.reference_steps()


@pytest.fixture(scope="session")
def flow_reference():
  """Two single steps of the toy with the flow-matching objective on one device (test_step.py,
  test_sharding.py)."""
  import toy_training  # pylint: disable=g-import-not-at-top
  return toy_training.reference_steps(2, toy_training.FLOW)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
  """A data_dir holding the prepared `jaxdiff_test_digits` TFDS dataset (tests/tfds_digits.py)."""
  import tfds_digits  # pylint: disable=g-import-not-at-top
  return tfds_digits.prepare(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> dict[str, str]:
  """The offline text-to-image setup of experiments/tiny_sd.py on the first 48 digits, and its
  cache encoded by `python -m jaxdiff.data.encode --pipeline` (test_encode.py,
  test_text_to_image.py): {"pipeline", "digits", "cache"} paths."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import tiny_sd as setup  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import encode  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_sd")
  pipeline, digits = setup.write_setup(str(root), count=48)
  flag_values = flags.FlagValues()
  encode.define_flags(flag_values)
  flag_values(["encode", f"--pipeline={pipeline}", "--source=captions", f"--folder={digits}",
               "--image_size=16", "--fit=resize", "--channels=1", "--batch_size=16",
               f"--output_dir={root / 'cache'}", "--num_threads=0"])
  encode.run(flag_values)
  return {"pipeline": pipeline, "digits": digits, "cache": str(root / "cache")}
