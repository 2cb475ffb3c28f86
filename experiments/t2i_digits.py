r"""Does guidance with "a handwritten digit N" pick digit N? configs/mnist_captions.py, end to end.

  python -m experiments.t2i_digits --out=/tmp/jaxdiff_t2i --steps=2000

Writes the tiny random Stable Diffusion pipeline and the captioned digits (experiments/tiny_sd.py)
and caches their latents and caption embeddings (`jaxdiff.data.encode`), each unless already
there; fine-tunes the pipeline's U-Net with `jaxdiff.train.loop.train` (what `python -m
jaxdiff.train` calls) on configs/mnist_captions.py; then, for each digit N and guidance scale,
samples latents for "a handwritten digit N" with the sampler of `python -m jaxdiff.sample` and
classifies them by the nearest class mean of the digits' own cached latents. The autoencoder is
random, so the check is made on latents (what the U-Net generates) rather than decoded pixels.
Prints and writes OUT/t2i_digits.json: the fraction of samples classified as the prompted digit
per scale (chance is 0.1), and the classifier's accuracy on the training latents themselves.
"""

import argparse
import dataclasses
import json
import os

from absl import flags
import jax
import numpy as np

from configs import mnist_captions
from experiments import tiny_sd
from jaxdiff import sample, sampling
from jaxdiff.data import encode
from jaxdiff.data import latents
from jaxdiff.diffusion import SamplerSettings
from jaxdiff.train import loop


def prepare(out: str) -> tuple[str, str]:
  """The pipeline and the cache under `out` (written when missing)."""
  pipeline, digits = os.path.join(out, "pipeline"), os.path.join(out, "digits")
  if not os.path.isdir(pipeline):
    pipeline, digits = tiny_sd.write_setup(out)
  cache = os.path.join(out, "cache")
  if not os.path.isfile(os.path.join(cache, latents.INFO_FILE)):
    flag_values = flags.FlagValues()
    encode.define_flags(flag_values)
    flag_values(["encode", f"--pipeline={pipeline}", "--source=captions", f"--folder={digits}",
                 "--image_size=16", "--fit=resize", "--channels=1", f"--output_dir={cache}"])
    encode.run(flag_values)
  return pipeline, cache


def class_means(cache: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(means float64 [10, h*w*c]: each digit's mean scaled training latent, the latents
  [N, h*w*c], their digits [N]); the caption index is the digit ("a handwritten digit N" sort)."""
  source = latents.LatentSource(cache, random_flip=False, sampling="mean")
  flat = np.stack([source.training_example(i, False, 0, i)["latent"].ravel()
                   for i in range(len(source))]).astype(np.float64)
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  return np.stack([flat[labels == d].mean(0) for d in range(10)]), flat, labels


def nearest(means: np.ndarray, flat: np.ndarray) -> np.ndarray:
  """Index of the nearest class mean of each row of flat [N, D]."""
  return np.argmin(((flat[:, None] - means[None]) ** 2).sum(-1), axis=1)


def sample_latents(workdir: str, prompts_file: str, scale: float, count: int,
                   steps: int) -> np.ndarray:
  """float64 [10, count, h*w*c]: latents for each digit's caption (prompt d of the file), drawn
  as `python -m jaxdiff.sample` draws them (same loading, sampler and keys), before decoding."""
  settings = SamplerSettings(num_steps=steps, guidance_scale=scale)
  options = sample.SampleOptions(workdir=workdir, prompts=prompts_file, num_samples=10 * count,
                                 sampler=settings)
  model, _, options = sample.load_model(options)
  model = dataclasses.replace(model, decoder=None)
  batch_fn = jax.jit(sampling.make_batch_fn(model, options.sampler))
  indices = np.arange(10 * count, dtype=np.int32)
  z = batch_fn(model.sampling_params, sampling.seed_key_data(0), indices,
               (indices // count).astype(np.int32))
  return np.asarray(z, np.float64).reshape(10, count, -1)


def run(out: str, steps: int, samples: int = 32, scales: tuple[float, ...] = (1.0, 3.0, 5.0),
        sampler_steps: int = 25) -> dict:
  """Prepares, trains `steps` steps and measures; returns (and writes) the results."""
  pipeline, cache = prepare(out)
  config = mnist_captions.get_config(f"steps={steps}")
  config.text.pipeline, config.data.latents_dir = pipeline, cache
  config.train.progress_bar = False
  workdir = os.path.join(out, f"run_{steps}")
  loop.train(config, workdir)
  means, flat, labels = class_means(cache)
  results = {"steps": steps, "samples_per_digit": samples, "sampler": f"ddim{sampler_steps}",
             "classifier_accuracy_on_training_latents": float(
                 (nearest(means, flat) == labels).mean()), "prompted_digit_fraction": {}}
  prompts = os.path.join(out, "digit_prompts.txt")
  with open(prompts, "w") as f:
    f.write("".join(f"a handwritten digit {d}\n" for d in range(10)))
  for scale in scales:
    z = sample_latents(workdir, prompts, scale, samples, sampler_steps)
    hits = [nearest(means, z[d]) == d for d in range(10)]
    results["prompted_digit_fraction"][f"{scale:g}"] = {
        "all": float(np.mean(hits)), "per_digit": [float(np.mean(h)) for h in hits]}
    print(f"guidance {scale:g}: {np.mean(hits):.3f} of samples are the prompted digit",
          flush=True)
  with open(os.path.join(out, "t2i_digits.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=mnist_captions.SETUP)
  parser.add_argument("--steps", type=int, default=2000, help="Training steps.")
  parser.add_argument("--samples", type=int, default=32, help="Samples per digit and scale.")
  parser.add_argument("--scales", default="1,3,5", help="Guidance scales.")
  args = parser.parse_args()
  results = run(args.out, args.steps, args.samples, tuple(map(float, args.scales.split(","))))
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
