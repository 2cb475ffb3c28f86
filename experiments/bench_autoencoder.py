"""Autoencoder decode speed: images/s of the KL decoder (latents -> RGB), jaxdiff vs diffusers.

Times one jitted decoder call per batch size (the call `decode_in_chunks` makes per chunk), in
float32 or bfloat16 compute, and with --torch diffusers' `AutoencoderKL.decode` of the same
architecture. The default is LDM's kl-f8 (Stable Diffusion / DiT VAE): 32x32x4 -> 256x256x3.

  python experiments/bench_autoencoder.py --batch_sizes=1,4 \
      --out=experiments/results/decode_kl-f8_cpu.json

Parameters are random (speed does not depend on them) and drawn in NumPy: compiling `init` of an
83M-parameter model costs minutes on CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from jaxdiff.models import autoencoder  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("autoencoder", "kl-f8", "Name in AUTOENCODER_SIZES.")
flags.DEFINE_integer("latent_size", 32, "Latent side (the image side is 8x this for kl-f8).")
flags.DEFINE_list("batch_sizes", [], "Batch sizes; empty = 1,4 on CPU, 16,64 elsewhere.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("iters", 0, "Timed runs (median reported); 0 = 1 on CPU, 5 elsewhere.")
flags.DEFINE_bool("torch", True, "Also time diffusers' AutoencoderKL.decode.")
flags.DEFINE_string("out", "experiments/results/bench_autoencoder.json", "JSON output path.")

COLUMNS = [("autoencoder", "autoencoder", ""), ("batch", "batch", "d"), ("dtype", "dtype", ""),
           ("compile_s", "compile (s)", ".1f"), ("decode_s", "decode (s)", ".3f"),
           ("images_per_s", "img/s", ".2f"), ("torch_images_per_s", "torch img/s", ".2f")]


def random_params(model: autoencoder.AutoencoderKL, latent_size: int):
  """N(0, 0.02) kernels, unit norm scales, zero biases, of the model's own shapes."""
  side = latent_size * model.downsample_factor
  image = jnp.zeros((1, side, side, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("'scale']"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("'bias']"):
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def bench_jax(model, params, batch: int, iters: int) -> dict:
  z = jax.random.normal(jax.random.key(1), (batch, FLAGS.latent_size, FLAGS.latent_size,
                                            model.latent_channels))
  decode = lambda p, z: model.apply({"params": p}, z, method=model.decode)
  compiled, compile_times = common.compile_timed(decode, params, z)
  warmup = 0 if jax.devices()[0].platform == "cpu" else 1
  timing = common.time_calls(lambda: compiled(params, z), warmup=warmup, iters=iters)
  return {"compile_s": compile_times["lower_and_compile_s"], "decode_s": timing["median_s"],
          "images_per_s": batch / timing["median_s"], "timing": timing}


def bench_torch(model, batch: int, iters: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL  # pylint: disable=import-outside-toplevel
  levels = len(model.block_out_channels)
  vae = AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      block_out_channels=model.block_out_channels, layers_per_block=model.layers_per_block,
      latent_channels=model.latent_channels, norm_num_groups=model.norm_groups,
      out_channels=model.out_channels).eval()
  dtype = torch.bfloat16 if FLAGS.dtype == "bfloat16" else torch.float32
  vae = vae.to(dtype)
  z = torch.randn(batch, model.latent_channels, FLAGS.latent_size, FLAGS.latent_size, dtype=dtype)

  def decode():
    with torch.no_grad():
      return vae.decode(z).sample

  timing = common.torch_time_calls(decode, warmup=0, iters=iters)
  return {"torch_decode_s": timing["median_s"],
          "torch_images_per_s": batch / timing["median_s"]}


def main(argv):
  del argv
  on_cpu = jax.devices()[0].platform == "cpu"
  batches = [int(b) for b in FLAGS.batch_sizes] or ([1, 4] if on_cpu else [16, 64])
  iters = FLAGS.iters or (1 if on_cpu else 5)
  info = common.machine_info()
  if FLAGS.torch:
    info["torch_threads"] = common.set_torch_threads()
  model = autoencoder.build_autoencoder(FLAGS.autoencoder, dtype=jnp.dtype(FLAGS.dtype))
  params = random_params(model, FLAGS.latent_size)
  records = []
  for batch in batches:
    record = {"autoencoder": FLAGS.autoencoder, "batch": batch, "dtype": FLAGS.dtype,
              "latent_size": FLAGS.latent_size,
              "image_size": FLAGS.latent_size * model.downsample_factor,
              **bench_jax(model, params, batch, iters)}
    if FLAGS.torch:
      record.update(bench_torch(model, batch, iters))
    record["loadavg"] = os.getloadavg()
    records.append(record)
    print(common.format_table([record], COLUMNS).splitlines()[-1], flush=True)
    common.write_json(FLAGS.out, {"benchmark": "autoencoder_decode", "machine": info,
                                  "settings": {"batch_sizes": batches, "iters": iters},
                                  "records": records})
  print(common.format_table(records, COLUMNS))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
