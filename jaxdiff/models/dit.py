"""Placeholder while the DiT is being written."""

import flax.linen as nn

DIT_SIZES = {}


class DiT(nn.Module):
  pass
