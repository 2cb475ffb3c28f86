"""Pipeline folders (jaxdiff/convert/pipeline.py) sampled by jaxdiff/sampling.py, against
diffusers' DiTPipeline and StableDiffusionPipeline fed the same initial latents.

jaxdiff's float images (the jitted batch function, before quantisation) are compared with the
pipelines' `output_type="np"` images in [0, 1], within 1e-3; the same images on 1 and 4 devices.
"""

import os
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from diffusers.pipelines.dit import pipeline_dit

import tiny_pipelines
from jaxdiff import sample, sampling
from jaxdiff.convert import pipeline as pipeline_lib
from jaxdiff.train.sharding import make_mesh

SEED = 3


def _initial_latents(model: sampling.DiffusionModel, count: int) -> torch.Tensor:
  """jaxdiff's x_T of samples 0..count-1 (first half of split(fold_in(key(SEED), i))), NCHW."""
  keys = [jax.random.split(jax.random.fold_in(jax.random.key(SEED), i))[0] for i in range(count)]
  x = np.stack([np.asarray(jax.random.normal(k, model.image_shape)) for k in keys])
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _jaxdiff_images(options: sample.SampleOptions):
  """(model, float images in [0, 1] [N, H, W, C]) through the sample CLI's own loading."""
  model, _, options = sample.load_model(options)
  labels = sample.conditioning_labels(options, model)
  batch_fn = jax.jit(sampling.make_batch_fn(model, options.sampler))
  x = batch_fn(model.sampling_params, sampling.seed_key_data(SEED),
               np.arange(len(labels), dtype=np.int32), labels)
  return model, options, np.clip((np.asarray(x) + 1) / 2, 0, 1)


def test_dit_pipeline_matches_diffusers(tmp_path, monkeypatch):
  folder = str(tmp_path / "dit")
  pipe = tiny_pipelines.save_dit_pipeline(folder)
  pipe.set_progress_bar_config(disable=True)
  options = sample.SampleOptions(
      diffusers=folder, labels=(3, 7, 999), num_samples=3, seed=SEED,
      sampler=sampling.SamplerSettings(num_steps=3, guidance_scale=4.0))
  model, options, got = _jaxdiff_images(options)
  assert model.learn_sigma and model.decoder is not None and options.sampler.method == "ddim"

  latents = _initial_latents(model, 3)
  # DiTPipeline takes no `latents=`; its only draw is the initial noise.
  monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda *args, **kwargs: latents.clone())
  with tiny_pipelines.one_torch_thread():
    want = pipe(class_labels=[3, 7, 999], guidance_scale=4.0, num_inference_steps=3,
                output_type="np").images
  assert got.shape == want.shape == (3, 16, 16, 3)
  assert want.std() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("pipelines") / "sd")
  return folder, tiny_pipelines.save_sd_pipeline(folder)


def test_stable_diffusion_pipeline_matches_diffusers(sd_folder):
  """Two prompts (P = 2, cycled over 4 samples), a negative prompt, guidance 5, the pipeline's
  DPM-Solver++ config."""
  folder, pipe = sd_folder
  prompts = ["a photo of the cat", "the cat"]
  prompts_file = os.path.join(os.path.dirname(folder), "prompts.txt")
  with open(prompts_file, "w") as f:
    f.write("\n".join(prompts) + "\n\n")
  options = sample.SampleOptions(
      diffusers=folder, prompts=prompts_file, negative_prompt="photo", num_samples=4, seed=SEED,
      sampler=sampling.SamplerSettings(num_steps=3, guidance_scale=5.0))
  model, options, got = _jaxdiff_images(options)
  assert model.text.prompts == tuple(prompts) and options.sampler.method == "dpmpp_2m"

  with torch.no_grad(), tiny_pipelines.one_torch_thread():
    want = pipe(prompt=prompts * 2, negative_prompt=["photo"] * 4, guidance_scale=5.0,
                num_inference_steps=3, latents=_initial_latents(model, 4), height=16, width=16,
                output_type="np").images
  assert got.shape == want.shape == (4, 16, 16, 3)
  assert want.std() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.slow
def test_stable_diffusion_same_images_on_one_and_four_devices(sd_folder):
  options = sample.SampleOptions(
      diffusers=sd_folder[0], prompt="a photo of the cat", num_samples=3, seed=SEED,
      sampler=sampling.SamplerSettings(num_steps=2, guidance_scale=5.0))
  model, _, options = sample.load_model(options)
  batch_fn = sampling.make_batch_fn(model, options.sampler)
  labels = sample.conditioning_labels(options, model)
  one = sampling.make_sampler(batch_fn, make_mesh(1, jax.devices()[:1]), batch_size=3)(
      model.sampling_params, labels, sampling.seed_key_data(SEED))
  four = sampling.make_sampler(batch_fn, make_mesh(), batch_size=4)(
      model.sampling_params, labels, sampling.seed_key_data(SEED))
  assert one.std() > 10
  # Per-device batches of 3 and 1 round differently in float32: a value at a .5 boundary may
  # quantise one level apart; the noise, prompts and steps are the same.
  assert np.abs(one.astype(np.int32) - four).max() <= 1 and np.mean(one == four) > 0.999


def test_long_prompt_is_truncated_with_a_warning(sd_folder):
  parts = pipeline_lib.load_pipeline(sd_folder[0])
  long_prompt = "a photo of the cat " * 4
  with pytest.warns(UserWarning, match="truncated"):
    text = sampling.encode_prompts(parts.tokenizer, *parts.text_encoder, [long_prompt])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    short = sampling.encode_prompts(parts.tokenizer, *parts.text_encoder, ["a photo of the cat"])
  assert text.contexts.shape == (1, tiny_pipelines.MAX_LENGTH, 16)
  assert np.abs(text.contexts - short.contexts).max() > 1e-3  # more of the prompt is kept


def test_missing_or_unsupported_part_is_named_in_one_line(sd_folder, tmp_path):
  for part in ("text_encoder", "tokenizer", "vae"):
    broken = str(tmp_path / part)
    shutil.copytree(sd_folder[0], broken)
    shutil.rmtree(os.path.join(broken, part))
    with pytest.raises(FileNotFoundError, match=f"without its {part}/ part") as error:
      pipeline_lib.load_pipeline(broken)
    assert "\n" not in str(error.value)
    options = sample.SampleOptions(diffusers=broken, prompt="a cat")
    with pytest.raises(sample.SampleInputError, match=f"without its {part}/ part"):
      sample.run(options)
  index = os.path.join(str(tmp_path / "vae"), pipeline_lib.INDEX_FILE)
  with open(index) as f:
    text = f.read()
  with open(index, "w") as f:
    f.write(text.replace("StableDiffusionPipeline", "StableDiffusionXLPipeline"))
  with pytest.raises(ValueError, match="StableDiffusionXLPipeline' is not supported"):
    pipeline_lib.pipeline_class(str(tmp_path / "vae"))
