"""jaxdiff.convert.torch_checkpoint against torch.load."""
import collections
import datetime

import numpy as np
import pytest
import torch

from jaxdiff.convert import torch_checkpoint


def _state_dict():
  generator = torch.Generator().manual_seed(0)
  return collections.OrderedDict(
      weight=torch.randn(3, 4, generator=generator),
      transposed=torch.randn(4, 5, generator=generator).t(),  # Non-contiguous strides.
      view=torch.randn(8, generator=generator)[2:6],  # Non-zero storage offset.
      steps=torch.tensor(7),
      ints=torch.arange(5, dtype=torch.int64),
      half=torch.randn(2, 3, generator=generator).half(),
      bf16=torch.randn(2, 2, generator=generator).bfloat16(),
      parameter=torch.nn.Parameter(torch.randn(3, generator=generator)),
  )


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_load_reads(tmp_path, zip_format):
  path = tmp_path / "state.pth"
  torch.save(_state_dict(), path, _use_new_zipfile_serialization=zip_format)
  expected = torch.load(path)
  got = torch_checkpoint.load_torch_state_dict(str(path))
  assert list(got) == list(expected)
  for name, tensor in expected.items():
    tensor = tensor.detach()
    assert got[name].shape == tuple(tensor.shape), name
    if tensor.dtype == torch.bfloat16:
      np.testing.assert_array_equal(got[name].astype(np.float32), tensor.float().numpy())
    else:
      assert got[name].dtype == tensor.numpy().dtype, name
      np.testing.assert_array_equal(got[name], tensor.numpy())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_refuses_arbitrary_globals(tmp_path, zip_format):
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(2), "date": datetime.date(2020, 1, 1)}, path,
             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(torch_checkpoint.TorchCheckpointError, match="refusing.*datetime"):
    torch_checkpoint.load_torch_state_dict(str(path))


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "noise.pth"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
  with pytest.raises(torch_checkpoint.TorchCheckpointError, match="not a"):
    torch_checkpoint.load_torch_state_dict(str(path))
