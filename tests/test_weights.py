"""jaxdiff.eval.weights: checksums, file lookup and the two state-dict layouts."""
import hashlib
import shutil

import jax
import numpy as np
import pytest
import torch

import fidelity_reference
from jaxdiff.convert import torch_checkpoint
from jaxdiff.eval import weights


@pytest.fixture(scope="module")
def random_weights():
  return fidelity_reference.random_inception_path()


def test_hash_prefix_from_file_name():
  assert weights.expected_hash_prefix("/a/pt_inception-2015-12-05-6726825d.pth") == "6726825d"
  assert weights.expected_hash_prefix(weights.TORCH_FIDELITY_URL) == "6726825d"
  assert weights.expected_hash_prefix("inception.pth") is None


def test_checksum_in_the_name_is_checked(tmp_path, random_weights):
  digest = hashlib.sha256(open(random_weights, "rb").read()).hexdigest()
  good = tmp_path / f"random-inception-{digest[:8]}.pth"
  shutil.copy(random_weights, good)
  assert weights.resolve_weights_path(str(good)) == str(good)
  bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  shutil.copy(random_weights, bad)
  with pytest.raises(weights.WeightsError, match="checksum mismatch"):
    weights.load_inception(str(bad))


def test_missing_file_names_the_flag(tmp_path):
  with pytest.raises(weights.WeightsError, match="--inception_weights"):
    weights.resolve_weights_path(str(tmp_path / "nothing.pth"))


def test_torch_fidelity_layout_maps_every_tensor(random_weights):
  state = torch.load(random_weights)
  with_logits, variables = weights.convert_state_dict(
      torch_checkpoint.load_torch_state_dict(random_weights))
  assert with_logits
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                state["Mixed_6b.branch7x7_2.conv.weight"].numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state["Mixed_7c.branch_pool.bn.running_var"].numpy())
  np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].numpy().T)
  num_values = sum(v.numel() for k, v in state.items() if "num_batches" not in k)
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == num_values


def test_pytorch_fid_wrapper_layout(random_weights):
  # pytorch-fid's InceptionV3 wrapper: blocks.<i>.<j>.* and no classifier.
  blocks = {"Conv2d_1a_3x3": "blocks.0.0", "Conv2d_4a_3x3": "blocks.1.1",
            "Mixed_6e": "blocks.2.7", "Mixed_7c": "blocks.3.2"}
  state = torch_checkpoint.load_torch_state_dict(random_weights)
  renamed = {}
  for name, value in state.items():
    head, rest = name.split(".", 1)
    if head != "fc":
      renamed[f"{blocks.get(head, head)}.{rest}"] = value
  with_logits, variables = weights.convert_state_dict(renamed)
  assert not with_logits
  np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch1x1"]["bn"]["mean"],
                                state["Mixed_7c.branch1x1.bn.running_mean"])


def test_wrong_shapes_are_refused(random_weights):
  state = torch_checkpoint.load_torch_state_dict(random_weights)
  state["Mixed_5b.branch1x1.conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  with pytest.raises(weights.WeightsError, match="wrong shape"):
    weights.convert_state_dict(state)
