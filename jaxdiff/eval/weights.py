"""Finding, verifying and converting the FID Inception weights.

The standard weights are the TF FID graph's, converted to PyTorch by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`) and re-hosted by torch-fidelity
(`weights-inception-2015-12-05-6726825d.pth`). Both use torchvision's Inception-v3 names
(`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`, `fc.weight`). A state dict of
pytorch-fid's `InceptionV3` wrapper (`blocks.2.0.branch1x1...`, no classifier) is also accepted.

As in torch hub, the hex digits after the last '-' of the file name are a prefix of the
file's sha256; a file that does not match is refused.
"""
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request

import numpy as np

from jaxdiff.eval import inception
from jaxdiff.convert import common
from jaxdiff.convert import torch_checkpoint

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxdiff")
_TORCH_HUB_DIR = os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints")

# pytorch-fid's InceptionV3 wrapper groups torchvision's layers into four Sequential blocks.
_PYTORCH_FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
# torch BasicConv2d / Linear leaf names -> (flax collection, flax leaf name).
_LEAVES = {
    "conv.weight": ("params", ("conv", "kernel")),
    "bn.weight": ("params", ("bn", "scale")),
    "bn.bias": ("params", ("bn", "bias")),
    "bn.running_mean": ("batch_stats", ("bn", "mean")),
    "bn.running_var": ("batch_stats", ("bn", "var")),
    "weight": ("params", ("kernel",)),
    "bias": ("params", ("bias",)),
}


class WeightsError(ValueError):
  """The Inception weights are missing, corrupt or of an unknown layout."""


def expected_hash_prefix(path: str) -> str | None:
  """The sha256 prefix named in a torch-hub style file name (`name-<hex>.pth`), if any."""
  match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", os.path.basename(path))
  return match.group(1) if match else None


def verify_checksum(path: str) -> None:
  """Raises WeightsError when the file's sha256 does not start with the prefix in its name."""
  prefix = expected_hash_prefix(path)
  if prefix is None:
    return
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  if not digest.hexdigest().startswith(prefix):
    raise WeightsError(
        f"checksum mismatch for {path}: sha256 {digest.hexdigest()[:len(prefix)]}... but the "
        f"file name says {prefix}; the file is corrupt or not the FID Inception weights")


def _download(url: str, dest: str) -> None:
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(dest), delete=False) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, tmp)
    except OSError as e:
      os.unlink(tmp.name)
      raise WeightsError(
          f"FID Inception weights not found locally and the download from {url} failed ({e}); "
          "pass a local copy with --inception_weights=/path/to/"
          "pt_inception-2015-12-05-6726825d.pth") from e
  # Name the temporary file like the target so that the checksum in the name is checked.
  checked = dest + ".partial-" + expected_hash_prefix(dest) + ".pth"
  os.replace(tmp.name, checked)
  try:
    verify_checksum(checked)
  except WeightsError:
    os.unlink(checked)
    raise
  os.replace(checked, dest)


def resolve_weights_path(path: str | None = None, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
  """Returns a verified local weights file, downloading the standard one when needed.

  Args:
    path: an explicit file (must exist). None looks in `cache_dir` and torch hub's cache for
      either standard file name, then downloads torch-fidelity's copy into `cache_dir`.
    cache_dir: where downloads go.

  Raises:
    WeightsError: the file is missing, fails its checksum, or cannot be downloaded.
  """
  if path:
    if not os.path.isfile(path):
      raise WeightsError(f"Inception weights file not found: {path} (--inception_weights)")
    verify_checksum(path)
    return path
  names = [os.path.basename(PYTORCH_FID_URL), os.path.basename(TORCH_FIDELITY_URL)]
  for directory in (cache_dir, _TORCH_HUB_DIR):
    for name in names:
      candidate = os.path.join(directory, name)
      if os.path.isfile(candidate):
        verify_checksum(candidate)
        return candidate
  dest = os.path.join(cache_dir, names[1])
  _download(TORCH_FIDELITY_URL, dest)
  return dest


def _canonical_name(name: str) -> str:
  """Maps pytorch-fid wrapper names (`blocks.i.j.`) and `module.` prefixes to torchvision's."""
  name = name.removeprefix("module.")
  match = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", name)
  if match:
    block, index, rest = int(match.group(1)), int(match.group(2)), match.group(3)
    name = f"{_PYTORCH_FID_BLOCKS[block][index]}.{rest}"
  return name


def _to_flax(name: str, value: np.ndarray):
  """(collection, path tuple, array in flax layout) for one torch state-dict entry."""
  for leaf, (collection, flax_leaf) in _LEAVES.items():
    if name.endswith("." + leaf):
      module_path = tuple(name[:-len(leaf) - 1].split("."))
      if leaf == "conv.weight" or (module_path == ("fc",) and leaf == "weight"):
        value = common.flax_kernel(value)
      return collection, module_path + flax_leaf, value
  raise WeightsError(f"unexpected entry in the Inception weights: {name}")


def convert_state_dict(state: dict[str, np.ndarray]) -> tuple[bool, dict]:
  """Torch FID Inception state dict -> (with_logits, flax variables).

  Returns:
    with_logits: whether the file has the classifier (`fc`), needed for the Inception Score.
    variables: {"params": ..., "batch_stats": ...} as float32 arrays.

  Raises:
    WeightsError: names or shapes that do not fit `inception.InceptionV3`.
  """
  variables = {"params": {}, "batch_stats": {}}
  for name, value in state.items():
    name = _canonical_name(name)
    if name.endswith("num_batches_tracked"):
      continue
    collection, path, array = _to_flax(name, np.asarray(value, np.float32))
    common.nested_set(variables[collection], path, array)
  with_logits = "fc" in variables["params"]
  common.check_shapes(inception.variable_shapes(with_logits), variables,
                      "the Inception weights", WeightsError)
  return with_logits, variables


def load_inception(path: str | None = None, cache_dir: str = DEFAULT_CACHE_DIR):
  """Finds, verifies and converts the FID Inception weights.

  Returns:
    (model: inception.InceptionV3, variables) ready for `model.apply(variables, x)`.
  """
  path = resolve_weights_path(path, cache_dir)
  try:
    state = torch_checkpoint.load_torch_state_dict(path)
  except torch_checkpoint.TorchCheckpointError as e:
    raise WeightsError(str(e)) from e
  with_logits, variables = convert_state_dict(state)
  return inception.InceptionV3(with_logits=with_logits), variables
