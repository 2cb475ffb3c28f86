"""torch-fidelity's reference code, importable without torchvision (test helper, not a test).

torch-fidelity's package `__init__` and `utils` import torchvision, which must not be installed
beside the CPU torch. Its Inception and metric modules need neither, so this registers an
empty package object and a stub `utils` and imports those modules directly.
"""
import atexit
import functools
import os
import shutil
import sys
import tempfile
import types
from unittest import mock

import numpy as np
import torch


def _import_reference_modules():
  root = os.path.join(os.path.dirname(torch.__file__), "..", "torch_fidelity")
  if "torch_fidelity" not in sys.modules or not hasattr(sys.modules["torch_fidelity"], "_stub"):
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [os.path.abspath(root)]
    package._stub = True
    sys.modules["torch_fidelity"] = package
    utils = types.ModuleType("torch_fidelity.utils")
    for name in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
                 "resolve_feature_extractor", "resolve_feature_layer_for_metric",
                 "get_cacheable_input_name", "cache_lookup_one_recompute_on_miss"):
      setattr(utils, name, None)
    sys.modules["torch_fidelity.utils"] = utils
  import torch_fidelity.feature_extractor_inceptionv3 as inception_module
  import torch_fidelity.interpolate_compat_tensorflow as interpolate_module
  import torch_fidelity.metric_fid as fid_module
  import torch_fidelity.metric_isc as isc_module
  import torch_fidelity.metric_kid as kid_module
  import torch_fidelity.metric_prc as prc_module
  return types.SimpleNamespace(inception=inception_module, interpolate=interpolate_module,
                               fid=fid_module, isc=isc_module, kid=kid_module, prc=prc_module)


reference = _import_reference_modules()


def save_random_inception(path, seed=0, calibrate=True):
  """Saves a randomly initialised torch-fidelity Inception state dict whose BN stats matter.

  With `calibrate`, the running statistics are set from one training-mode pass (so activations
  stay O(1) through all layers instead of vanishing); BN scales and biases are then perturbed.
  """
  fe = reference.inception
  torch.manual_seed(seed)
  with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
       mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda s, d: None):
    model = fe.FeatureExtractorInceptionV3("random", ["2048"])
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  if calibrate:
    for norm in norms:
      norm.momentum = 1.0
    model.train()
    calibration = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
      model(calibration)
    model.eval()
  generator = torch.Generator().manual_seed(seed + 1)
  for norm in norms:
    norm.weight.data = torch.rand(norm.weight.shape, generator=generator) + 0.5
    norm.bias.data = torch.randn(norm.bias.shape, generator=generator) * 0.2
  torch.nn.init.normal_(model.fc.bias, std=0.5, generator=generator)
  torch.save(model.state_dict(), path)


@functools.cache
def random_inception_path(seed=0, calibrate=True):
  """A random state dict saved once per test session (building it takes seconds)."""
  directory = tempfile.mkdtemp(prefix="jaxdiff-test-inception-")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  path = os.path.join(directory, f"random_inception_{seed}_{int(calibrate)}.pth")
  save_random_inception(path, seed, calibrate)
  return path


@functools.cache
def _reference_model(path):
  return reference.inception.FeatureExtractorInceptionV3(
      "reference", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=path)


def reference_features(path, images_uint8):
  """torch-fidelity's ("2048", "logits_unbiased", "logits") for uint8 NHWC images, and ADM's
  sFID features: the first 7 channels of Mixed_6d.branch1x1 (TF `mixed_6/conv`), read with a
  forward hook and flattened in TF's NHWC order."""
  model = _reference_model(path)
  x = torch.from_numpy(np.ascontiguousarray(images_uint8.transpose(0, 3, 1, 2)))
  captured = {}
  hook = model.Mixed_6d.branch1x1.register_forward_hook(
      lambda module, inputs, output: captured.setdefault("branch1x1", output))
  try:
    with torch.no_grad():
      pool, unbiased, logits = model(x)
  finally:
    hook.remove()
  spatial = captured["branch1x1"][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
  return {"pool": pool.numpy(), "logits_unbiased": unbiased.numpy(), "logits": logits.numpy(),
          "spatial": spatial.numpy()}
