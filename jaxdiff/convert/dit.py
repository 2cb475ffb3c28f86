"""Placeholder while the DiT converter is being written."""


def convert(config, state, **overrides):
  raise NotImplementedError("DiT conversion is not written yet")
