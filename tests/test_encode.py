"""python -m jaxdiff.data.encode: cached latents equal the autoencoder's posterior, both flips."""
import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jaxdiff import data
from jaxdiff.data import encode
from jaxdiff.data import latents
from jaxdiff.models import autoencoder as ae

_VAE_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                   layers_per_block=1, latent_channels=4, norm_num_groups=4,
                   scaling_factor=0.7, shift_factor=0.1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Seven 16x16 RGB images in two classes, asymmetric so that flips differ."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(7):
    (root / f"class_{i % 2}").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        root / f"class_{i % 2}" / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("vae")
  torch.manual_seed(0)
  model = TorchAutoencoderKL(**_VAE_CONFIG).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return str(path)


def _posterior(vae_folder, images_uint8):
  """diffusers' posterior (mean, std) of uint8 NHWC images, as NHWC float64."""
  model = TorchAutoencoderKL.from_pretrained(vae_folder).eval()
  x = torch.from_numpy(images_uint8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
  with torch.no_grad():
    dist = model.encode(x).latent_dist
  return [t.numpy().transpose(0, 2, 3, 1).astype(np.float64) for t in (dist.mean, dist.std)]


def test_cli_stores_posterior_of_both_flips_and_statistics(tmp_path, image_folder, vae_folder):
  output = tmp_path / "latents"
  flag_values = flags.FlagValues()
  encode.define_flags(flag_values)
  flag_values(["encode", f"--autoencoder={vae_folder}", f"--output_dir={output}",
               "--source=folder", f"--folder={image_folder}", "--image_size=16",
               "--random_flip", "--batch_size=4", "--records_per_shard=3", "--num_threads=0"])
  info = encode.run(flag_values)
  assert info == json.loads((output / latents.INFO_FILE).read_text())
  assert (info["num_examples"], info["latent_shape"], info["variants"]) == (7, [8, 8, 4], 2)
  assert (info["num_classes"], info["scaling_factor"], info["shift_factor"]) == (2, 0.7, 0.1)
  assert len(info["files"]) == 3  # 3 + 3 + 1 records

  images_cfg = data.DataConfig(source="folder", folder=image_folder, image_size=16)
  images = next(data.iterate_dataset(images_cfg, batch_size=7))["image"]
  mean, std = _posterior(vae_folder, images)
  flip_mean, flip_std = _posterior(vae_folder, np.ascontiguousarray(images[:, :, ::-1]))
  source = latents.LatentSource(str(output), random_flip=True)
  stored = np.stack([source[i]["moments"] for i in range(7)])  # [7, 2, 2, 8, 8, 4]
  np.testing.assert_array_equal([source[i]["label"] for i in range(7)],
                                next(data.iterate_dataset(images_cfg, batch_size=7))["label"])
  for got, want in ((stored[:, 0, 0], mean), (stored[:, 0, 1], std),
                    (stored[:, 1, 0], flip_mean), (stored[:, 1, 1], flip_std)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
  assert np.abs(flip_mean - mean).max() > 0.1  # the flip really is another image

  # Statistics of z ~ q(z | x) over both variants, in closed form from diffusers' moments.
  means = np.concatenate([mean, flip_mean]).reshape(-1, 4)
  second = np.concatenate([mean**2 + std**2, flip_mean**2 + flip_std**2]).reshape(-1, 4)
  channel_mean = means.mean(0)
  np.testing.assert_allclose(info["channel_mean"], channel_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(info["channel_std"], np.sqrt(second.mean(0) - channel_mean**2),
                             rtol=1e-4)
  overall_std = np.sqrt(second.mean() - means.mean()**2)
  assert info["suggested_scaling_factor"] == pytest.approx(1 / overall_std, rel=1e-4)

  with pytest.raises(ValueError, match="already holds"):
    encode.run(flag_values)


def test_encode_dataset_takes_any_module_and_params(tmp_path, image_folder):
  """The entry point for jaxdiff-trained autoencoders: (module, params), no flips."""
  module = ae.build_autoencoder("kl-tiny", scaling_factor=2.0)
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32),
                        jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  cfg = data.DataConfig(source="folder", folder=image_folder, image_size=16, num_threads=0)
  info = encode.encode_dataset(cfg, module, params, str(tmp_path), batch_size=8)
  assert (info["num_examples"], info["variants"], info["scaling_factor"]) == (7, 1, 2.0)
  latent_cfg = data.DataConfig(source="latents", latents_dir=str(tmp_path), num_threads=0)
  assert data.dataset_info(latent_cfg) == data.DatasetInfo(8, 4, 2, 7)
  with pytest.raises(ValueError, match="already encoded"):
    encode.encode_dataset(latent_cfg, module, params, str(tmp_path / "again"))
  for bad, message in ((dict(channels=1), "--channels=3"), (dict(image_size=15), "divisible")):
    with pytest.raises(ValueError, match=message):
      encode.encode_dataset(data.DataConfig(source="folder", folder=image_folder, **{
          "image_size": 16, **bad}), module, params, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # nothing written


def test_caption_embeddings_are_cached_once_per_caption_as_the_text_encoder_gives_them(tiny_sd):
  from transformers import CLIPTextModel, CLIPTokenizer  # pylint: disable=g-import-not-at-top
  info = latents.read_latents_info(tiny_sd["cache"])
  assert info["captions"] == [f"a handwritten digit {n}" for n in range(10)]
  assert info["context_shape"] == [8, 32] and info["num_examples"] == 48
  assert info["latent_shape"] == [8, 8, 4]
  # Reference: transformers' tokenizer and CLIPTextModel on the captions and the empty prompt.
  tokenizer = CLIPTokenizer.from_pretrained(f"{tiny_sd['pipeline']}/tokenizer")
  model = CLIPTextModel.from_pretrained(f"{tiny_sd['pipeline']}/text_encoder").eval()
  ids = tokenizer(info["captions"] + [""], padding="max_length", max_length=8,
                  truncation=True, return_tensors="pt").input_ids
  assert tokenizer.convert_ids_to_tokens(ids[3])[:6] == [  # the words are kept whole
      "<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "3</w>", "<|endoftext|>"]
  with torch.no_grad():
    want = model(ids).last_hidden_state.numpy()
  source = latents.LatentSource(tiny_sd["cache"], random_flip=False)
  np.testing.assert_allclose(source.contexts, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # Each record's label is its image's caption in the table: the digit of the image file.
  captions_cfg = data.DataConfig(source="captions", folder=tiny_sd["digits"])
  from jaxdiff.data.captions import CaptionFolderSource  # pylint: disable=g-import-not-at-top
  images = CaptionFolderSource(captions_cfg)
  for index in range(48):
    assert info["captions"][source[index]["label"]] == images.caption(index)


def test_caption_embeddings_need_a_caption_source(tmp_path, tiny_sd):
  with pytest.raises(ValueError, match="--source=captions"):
    encode.encode_dataset(data.DataConfig(source="mnist_offline", image_size=16, channels=1),
                          None, None, str(tmp_path),
                          text=encode.TextEncoder(None, None, None))
  assert not list(tmp_path.iterdir())
