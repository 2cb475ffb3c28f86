"""Tests for configs/ and jaxdiff.config: every config parses, recipes match the papers, and bad
values are refused with a message that names the field."""

import importlib
import json
import os

import ml_collections
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff.data import DatasetInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("base", "cifar_dit", "cifar_unet", "fashion_mnist_unet", "fashion_mnist_dit",
               "mnist_offline", "unet_vs_dit", "imagenet256_dit", "cifar_sit", "cifar_edm",
               "mnist_autoencoder", "mnist_latent_dit")


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_parses(name, arg):
  parsed = config_lib.parse_config(load(name, arg))
  assert parsed.train.num_steps % parsed.train.steps_per_dispatch == 0
  if arg == "tiny":
    assert parsed.model.name in ("dit-tiny", "unet-tiny", "kl-tiny")
    assert not parsed.model.overrides.get("depth")  # tiny means the table's tiny size
    assert parsed.train.batch_size == 8 and parsed.train.num_steps <= 16


def test_configs_are_locked():
  config = load("cifar_dit")
  with pytest.raises(AttributeError):
    config.modle = 1
  with pytest.raises(AttributeError):
    config.model.depht = 4


def test_every_base_field_has_a_comment():
  with open(os.path.join(REPO, "configs", "base.py"), encoding="utf-8") as f:
    body = f.read().split("def apply_variants")[0]  # get_config, where the fields are defined
  lines = [line for line in body.splitlines()
           if line.strip().startswith("config.") and " = " in line]
  assert len(lines) > 60
  uncommented = [line.strip() for line in lines if "#" not in line and "ConfigDict()" not in line]
  assert not uncommented


def test_cifar_unet_is_the_ddpm_recipe():
  # Ho et al. 2020, Appendix B: linear betas 1e-4 -> 0.02, T=1000, lr 2e-4, batch 128,
  # EMA 0.9999, dropout 0.1 on CIFAR-10.
  c = config_lib.parse_config(load("cifar_unet"))
  assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
  assert (c.optimizer.learning_rate, c.train.batch_size) == (2e-4, 128)
  assert c.train.ema_decays == (0.9999,)
  assert c.model.name == "unet-ddpm-cifar10" and c.model.overrides["dropout"] == 0.1
  assert (c.data.source, c.data.name) == ("tfds", "cifar10")


def test_imagenet256_dit_is_the_dit_paper_recipe():
  # Peebles & Xie 2023, Sec. 4: DiT-XL/2, learned sigma, label dropout 0.1, AdamW 1e-4 constant,
  # no weight decay, batch 256, EMA 0.9999, 400k steps, T=1000 linear; latents of the SD VAE.
  c = config_lib.parse_config(load("imagenet256_dit"))
  assert (c.model.name, c.model.learn_sigma, c.model.class_dropout_prob) == ("dit-xl/2", True, 0.1)
  assert (c.optimizer.learning_rate, c.optimizer.decay, c.optimizer.warmup_steps) == (
      1e-4, "constant", 0)
  assert c.optimizer.weight_decay == 0.0 and c.train.batch_size == 256
  assert c.train.ema_decays == (0.9999,) and c.train.num_steps == 400_000
  assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
  assert c.data.source == "latents"
  assert load("imagenet256_dit", "model=dit-b/2").model.name == "dit-b/2"


def test_cifar_dit_is_class_conditional_with_label_dropout():
  c = config_lib.parse_config(load("cifar_dit"))
  assert c.model.name == "dit-s/2" and c.model.class_conditional
  assert c.model.class_dropout_prob == 0.1 and c.sample.sampler.guidance_scale > 0


def test_cifar_sit_is_dit_s2_trained_with_flow_matching():
  # Ma et al. 2024, sec. 4: linear interpolant, velocity, uniform t, AdamW lr 1e-4 constant,
  # batch 256, EMA 0.9999, label dropout 0.1; ODE (Heun) or SDE (Euler-Maruyama) sampling.
  c = config_lib.parse_config(load("cifar_sit"))
  assert (c.model.name, c.diffusion.objective, c.diffusion.flow_timestep_sampling,
          c.diffusion.flow_shift) == ("dit-s/2", "flow", "uniform", 1.0)
  assert (c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.decay,
          c.optimizer.weight_decay) == (1e-4, 0, "constant", 0.0)
  assert (c.train.batch_size, c.train.ema_decays) == (256, (0.9999,))
  assert c.model.class_conditional and c.model.class_dropout_prob == 0.1
  assert c.sample.sampler.method == "heun"
  sde = config_lib.parse_config(load("cifar_sit", "sde")).sample.sampler
  assert (sde.method, sde.num_steps, sde.diffusion_scale) == ("euler_maruyama", 250, 1.0)


def test_cifar_edm_is_the_edm_cifar10_recipe():
  # Karras et al. 2022, Table 1 and Appendix F.1.
  c = config_lib.parse_config(load("cifar_edm"))
  d, s = c.diffusion, c.sample.sampler
  assert (d.objective, d.edm_p_mean, d.edm_p_std, d.edm_sigma_data) == ("edm", -1.2, 1.2, 0.5)
  assert (s.method, s.num_steps, s.sigma_min, s.sigma_max, s.rho, s.s_churn) == (
      "heun", 18, 0.002, 80.0, 7.0, 0.0)
  assert (c.optimizer.learning_rate, c.train.batch_size) == (1e-3, 512)
  assert c.train.num_steps * 512 == pytest.approx(200e6, rel=1e-5)  # 200 Mimg
  assert 0.5 ** (512 / 500_000) == pytest.approx(c.train.ema_decays[0], abs=1e-5)  # 0.5 Mimg
  assert c.model.overrides["dropout"] == 0.13 and not c.model.class_conditional


def test_mnist_offline_flow_variant_changes_only_the_objective_and_sampler():
  ddpm, flow = load("mnist_offline").to_dict(), load("mnist_offline", "flow").to_dict()
  assert (flow["diffusion"].pop("objective"), ddpm["diffusion"].pop("objective")) == (
      "flow", "ddpm")
  assert (flow["sample"].pop("method"), ddpm["sample"].pop("method")) == ("euler", "dpmpp_2m")
  assert (flow["sample"].pop("num_steps"), ddpm["sample"].pop("num_steps")) == (20, 10)
  assert flow == ddpm


def test_fashion_mnist_configs_differ_only_in_the_backbone():
  unet = load("fashion_mnist_unet").to_dict()
  dit = load("fashion_mnist_dit").to_dict()
  assert unet["model"].pop("name") == "unet-small"
  assert dit["model"].pop("name") == "dit-s/2"
  dit_overrides = {k: v for k, v in dit["model"].pop("overrides").items() if v is not None}
  assert not any(v is not None for v in unet["model"].pop("overrides").values())
  assert unet == dit
  # The DiT is narrowed so that the two backbones have matched parameter counts (within 1%).
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxdiff.models import build_model  # pylint: disable=g-import-not-at-top

  def count(name, **fields):
    model = build_model(name, num_classes=10, class_dropout_prob=0.1, **fields)
    args = (jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return sum(x.size for x in jax.tree.leaves(shapes))
  assert abs(count("dit-s/2", **dit_overrides) / count("unet-small") - 1) < 0.01


def test_variants():
  c = config_lib.parse_config(load("cifar_dit", "model=dit-b/2,steps=10"))
  assert c.model.name == "dit-b/2" and c.train.num_steps == 10
  with pytest.raises(ValueError, match="unknown config variant"):
    load("cifar_dit", "huge")


def test_unet_vs_dit_variants_differ_only_in_the_backbone():
  unet = load("unet_vs_dit", "backbone=unet,scale=cpu,steps=40").to_dict()
  dit = load("unet_vs_dit", "backbone=dit,scale=cpu,steps=40").to_dict()
  assert (unet["model"].pop("name"), dit["model"].pop("name")) == ("unet-tiny", "dit-s/2")
  unet["model"].pop("overrides"), dit["model"].pop("overrides")
  assert unet == dit
  assert unet["train"]["num_steps"] == 40 and unet["optimizer"]["warmup_steps"] == 2
  with pytest.raises(ValueError, match="backbone"):
    load("unet_vs_dit", "backbone=vit")


def test_configs_do_not_restate_base_defaults():
  base = load("base").to_dict()
  for name in EXPERIMENTS[1:]:
    path = os.path.join(REPO, "configs", f"{name}.py")
    with open(path, encoding="utf-8") as f:
      assignments = {line.split("#")[0].strip() for line in f}
    for section, fields in base.items():
      if not isinstance(fields, dict):
        continue
      for field, value in fields.items():
        line = f"config.{section}.{field} = {value!r}"
        assert line not in assignments, f"{name}.py restates the base default: {line}"


def _parse_with(name="base", **overrides):
  config = load(name, "tiny")
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config_lib.parse_config(config)


@pytest.mark.parametrize("overrides, field", [
    (dict(model__name="dit-huge"), "model.name"),
    (dict(model__dtype="float16"), "model.dtype"),
    (dict(model__overrides__dropout=0.1), "model.overrides.dropout"),  # a DiT has no dropout
    (dict(diffusion__prediction="score"), "diffusion.prediction"),
    (dict(optimizer__learning_rate=0.0), "optimizer.learning_rate"),
    (dict(train__ema_decays=(1.5,)), "train.ema_decays"),
    (dict(train__steps_per_dispatch=3), "train.num_steps"),
    (dict(sample__guidance_scale=2.0), "sample.guidance_scale"),  # unconditional model
    (dict(sample__ema_decay=0.5), "sample.ema_decay"),
    (dict(data__source="imagenet"), "config.data"),
    (dict(eval__fid_every=-1), "eval.fid_every"),
    (dict(eval__fid_every=100), "eval.reference_stats"),  # FID needs reference statistics
    (dict(diffusion__objective="score"), "diffusion.objective"),
    (dict(diffusion__objective="flow"), "sample.method"),  # base's ddim is not a flow sampler
    (dict(diffusion__objective="edm", sample__method="euler"), "sample.method"),
    (dict(diffusion__objective="flow", sample__method="euler", model__learn_sigma=True),
     "model.learn_sigma"),
    (dict(diffusion__objective="edm", sample__method="heun", model__learn_sigma=True),
     "model.learn_sigma"),
    (dict(diffusion__objective="flow", sample__method="euler",
          diffusion__flow_timestep_sampling="beta"), "diffusion.flow_timestep_sampling"),
    (dict(diffusion__objective="flow", sample__method="euler", diffusion__flow_shift=0.0),
     "diffusion.flow_shift"),
    (dict(diffusion__objective="flow", sample__method="heun", sample__spacing="trailing"),
     "sample.spacing"),
    (dict(diffusion__objective="edm", sample__method="heun", diffusion__weighting="min_snr"),
     "diffusion.weighting"),
    (dict(diffusion__objective="edm", sample__method="heun", sample__num_steps=1),
     "sample.num_steps"),
    (dict(diffusion__objective="edm", sample__method="heun", sample__sigma_min=100.0),
     "sample.sigma_min"),
    (dict(diffusion__objective="edm", sample__method="heun", diffusion__edm_sigma_data=0.0),
     "diffusion.edm_sigma_data"),
])
def test_bad_values_name_the_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    _parse_with(**overrides)


@pytest.mark.parametrize("name, overrides, field", [
    ("base", dict(task="gan"), "task"),
    ("mnist_autoencoder", dict(model__name="dit-tiny"), "model.name"),  # not an autoencoder
    ("base", dict(model__name="kl-tiny"), "model.name"),  # not a denoiser
    ("mnist_autoencoder", dict(autoencoder__loss_type="huber"), "autoencoder.loss_type"),
    ("mnist_autoencoder", dict(autoencoder__kl_weight=-1.0), "autoencoder.kl_weight"),
    ("mnist_autoencoder", dict(model__class_conditional=True), "model.class_conditional"),
    ("mnist_autoencoder", dict(data__source="latents", data__latents_dir="x"), "data.source"),
    ("mnist_autoencoder", dict(model__overrides__depth=2), "model.overrides.depth"),
    ("mnist_latent_dit", dict(autoencoder__path=""), "autoencoder.path"),
])
def test_bad_latent_and_autoencoder_values_name_the_field(name, overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    _parse_with(name, **overrides)


def test_latent_and_autoencoder_configs():
  autoencoder = config_lib.parse_config(load("mnist_autoencoder"))
  assert (autoencoder.task, autoencoder.model.name) == ("autoencoder", "kl-f4-small")
  assert (autoencoder.autoencoder.loss_type, autoencoder.autoencoder.kl_weight) == ("l1", 1e-6)
  latent = config_lib.parse_config(load("mnist_latent_dit"))
  assert (latent.task, latent.data.source) == ("diffusion", "latents")
  assert latent.autoencoder.path == "runs/mnist_autoencoder"
  assert not latent.sample.sampler.clip_denoised
  info = DatasetInfo(image_size=8, channels=4, num_classes=10, num_examples=100)
  with pytest.raises(config_lib.ConfigError, match=r"autoencoder\.path=.*no such folder"):
    config_lib.check_run(latent, info, num_devices=1, process_count=1)
  info = DatasetInfo(image_size=32, channels=1, num_classes=10, num_examples=100)
  config_lib.check_run(autoencoder, info, num_devices=1, process_count=1)
  odd = DatasetInfo(image_size=30, channels=1, num_classes=10, num_examples=100)
  with pytest.raises(config_lib.ConfigError, match=r"data\.image_size=30.*divisible by 4"):
    config_lib.check_run(autoencoder, odd, num_devices=1, process_count=1)


def test_check_run_refuses_bad_batch_patch_and_labels():
  info = DatasetInfo(image_size=16, channels=1, num_classes=10, num_examples=100)
  parsed = _parse_with()
  config_lib.check_run(parsed, info, num_devices=4, process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"train\.batch_size=8.*device count 3"):
    config_lib.check_run(parsed, info, num_devices=3, process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"mesh\.fsdp=3"):
    config_lib.check_run(_parse_with(mesh__fsdp=3), info, num_devices=4, process_count=1)
  odd = DatasetInfo(image_size=15, channels=1, num_classes=10, num_examples=100)
  with pytest.raises(config_lib.ConfigError, match=r"data\.image_size=15.*patch size 2"):
    config_lib.check_run(parsed, odd, num_devices=1, process_count=1)
  unlabelled = DatasetInfo(image_size=16, channels=1, num_classes=0, num_examples=100)
  conditional = _parse_with(model__class_conditional=True)
  with pytest.raises(config_lib.ConfigError, match=r"model\.class_conditional"):
    config_lib.check_run(conditional, unlabelled, num_devices=1, process_count=1)


def test_model_fields_follow_the_dataset():
  info = DatasetInfo(image_size=16, channels=3, num_classes=10, num_examples=100)
  conditional = _parse_with(model__class_conditional=True, model__class_dropout_prob=0.1)
  fields = config_lib.model_fields(conditional.model, info)
  assert fields["num_classes"] == 10 and fields["class_dropout_prob"] == 0.1
  unconditional = _parse_with(model__class_dropout_prob=0.1)
  fields = config_lib.model_fields(unconditional.model, info)
  assert fields["num_classes"] == 0 and fields["class_dropout_prob"] == 0.0


@pytest.mark.slow  # about 50 s: three runs, each compiling a train step and two samplers
def test_flow_and_edm_configs_train_two_steps_and_their_checkpoints_sample(tmp_path):
  """The tiny variants through the real loop (EMA preview at step 2) and the sample CLI, on the
  offline digits at 8x8 so that no dataset has to be prepared."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdiff import sample  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import loop  # pylint: disable=g-import-not-at-top
  for name, arg in (("mnist_offline", "tiny,flow"), ("cifar_sit", "tiny"), ("cifar_edm", "tiny")):
    config = load(name, f"{arg},steps=2")
    config.data.source, config.data.name, config.data.image_size = "mnist_offline", "", 8
    config.train.sample_every = 2
    config.sample.num_images = 2
    workdir = str(tmp_path / name)
    assert int(loop.train(config, workdir, devices=jax.devices()[:1]).step) == 2
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if '"train/loss"' in line]
    assert rows and all(0 < row["train/loss"] < 1e3 for row in rows)
    assert any(key.startswith("train/loss_q") for key in rows[-1])
    assert os.listdir(os.path.join(workdir, "samples")), "no EMA preview grid"
    out = str(tmp_path / f"{name}_samples")
    paths = sample.run(sample.SampleOptions(workdir=workdir, num_samples=2, batch_size=2, out=out))
    with np.load(paths["npz"]) as data:
      assert data["arr_0"].shape == (2, 8, 8, 1) and data["arr_0"].std() > 0
      assert str(data["method"]) == config.sample.method  # the run's own sampler
      assert not bool(data["clip_denoised"])


def test_mnist_captions_fine_tunes_the_pipeline_unet_on_cached_captions(tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  config = load("mnist_captions")
  config.text.pipeline = str(tmp_path)
  parsed = config_lib.parse_config(config)
  assert (parsed.model.name, parsed.data.source, parsed.diffusion.schedule) == (
      "pipeline", "latents", "scaled_linear")
  assert parsed.text == config_lib.TextConfig(str(tmp_path), 0.1, True)
  assert not parsed.sample.sampler.clip_denoised and parsed.train.sample_every == 0
  # Configs written before text-to-image parse with text-to-image off.
  old = load("mnist_offline")
  with old.unlocked():
    del old["text"]
  assert not config_lib.parse_config(old).text.enabled


@pytest.mark.parametrize("overrides, field", [
    (dict(data__source="mnist_offline"), "data.source"),
    (dict(model__name="unet-tiny"), "model.name"),
    (dict(model__overrides__channels=8), "model.overrides.channels"),
    (dict(model__class_conditional=True), "model.class_conditional"),
    (dict(train__sample_every=100), "train.sample_every"),
    (dict(text__caption_dropout_prob=1.0), "text.caption_dropout_prob"),
    (dict(text__pipeline="/nonexistent/pipeline"), "text.pipeline"),
    (dict(text__pipeline=""), "model.name"),  # model.name="pipeline" without a pipeline
])
def test_bad_text_to_image_values_name_the_field(tmp_path, overrides, field):
  (tmp_path / "model_index.json").write_text("{}")
  config = load("mnist_captions")
  config.text.pipeline = str(tmp_path)
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.parse_config(config)
