"""Experiment configs: `base.py` holds every field; each experiment overrides a handful.

An importable package (`from configs import base`), installed with jaxdiff in editable mode, so
`python -m jaxdiff.train --config=configs/X.py`, the experiments and the tests load the same files
without path tricks.
"""
