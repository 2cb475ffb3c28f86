"""Training: train state and optimizer, the pure train step, sharding, checkpoints, the loop.

Entry point: `python -m jaxdiff.train --config=configs/X.py --workdir=DIR` (see __main__.py).
Library use: `jaxdiff.train.loop.train(config_dict, workdir)`;
`jaxdiff.train.checkpoint.restore_for_inference(workdir)` for sampling from a run.
"""
