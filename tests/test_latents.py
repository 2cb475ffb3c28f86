"""The `latents` data source: cached posterior moments through the deterministic train stream."""
import dataclasses
import json
import os

from array_record.python import array_record_module
import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.data import latents
from jaxdiff.data import pipeline

_N, _SHAPE = 10, (2, 2, 3)
_SCALE, _SHIFT = 0.5, 0.25


def _moments(index: int) -> np.ndarray:
  """[2 variants, (mean, std), 2, 2, 3]: the mean encodes (index, variant), std > 0 per index."""
  out = np.empty((2, 2) + _SHAPE, np.float32)
  for variant in range(2):
    out[variant, 0] = 10 * index + variant + np.arange(12).reshape(_SHAPE) / 100
    out[variant, 1] = 0.1 + index / 100
  return out


def _write_folder(path, variants: int = 2, per_shard: int = 4) -> str:
  """A latents folder written with ArrayRecord directly (independently of encode.py)."""
  files = [latents.shard_name(i, 3) for i in range(3)]
  for shard, name in enumerate(files):
    writer = array_record_module.ArrayRecordWriter(str(path / name), "group_size:1")
    for index in range(shard * per_shard, min(_N, (shard + 1) * per_shard)):
      moments = _moments(index)[:variants]
      writer.write(moments.astype("<f4").tobytes() + np.int32(index % 3).tobytes())
    writer.close()
  info = {"format": latents.FORMAT, "num_examples": _N, "latent_shape": list(_SHAPE),
          "variants": variants, "num_classes": 3, "scaling_factor": _SCALE,
          "shift_factor": _SHIFT, "files": files}
  (path / latents.INFO_FILE).write_text(json.dumps(info))
  return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("latents"))


def _cfg(folder, **overrides):
  return data.DataConfig(source="latents", latents_dir=folder, num_threads=2, **overrides)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _stream(cfg, seed, process_index=0, process_count=1, batch=4):
  return data.make_train_iterator(cfg, global_batch_size=batch, seed=seed,
                                  process_index=process_index, process_count=process_count)


def test_records_round_trip_and_dataset_info(folder):
  source = latents.LatentSource(folder, random_flip=True)
  assert len(source) == _N and source.latent_shape == _SHAPE
  for index in range(_N):
    item = source[index]
    np.testing.assert_array_equal(item["moments"], _moments(index))
    assert item["label"] == index % 3
  moments = _moments(3)
  np.testing.assert_array_equal(
      latents.unpack_record(latents.pack_record(moments, 7), 2, _SHAPE)[0], moments)
  assert data.dataset_info(_cfg(folder)) == data.DatasetInfo(2, 3, 3, _N)


def test_mean_stream_is_the_shuffled_flipped_scaled_mean(folder):
  seed = 4
  batches = _take(_stream(_cfg(folder, random_flip=True, latent_sampling="mean"), seed), 6)
  flips = []
  for step, batch in enumerate(batches):
    assert set(batch) == {"latent", "label"} and batch["latent"].shape == (4,) + _SHAPE
    assert batch["latent"].dtype == np.float32
    for row in range(4):
      position = step * 4 + row
      epoch, offset = divmod(position, _N)
      index = int(pipeline.epoch_permutation(seed, epoch, _N)[offset])
      flip = pipeline.flip_bit(seed, position)
      flips.append(flip)
      expected = (_moments(index)[int(flip), 0].astype(np.float64) - _SHIFT) * _SCALE
      np.testing.assert_allclose(batch["latent"][row], expected, rtol=1e-6)
      assert batch["label"][row] == index % 3
  assert 0 < sum(flips) < len(flips)  # Both stored variants are used.


def test_sampled_latents_follow_the_posterior_and_change_every_epoch(folder):
  cfg = _cfg(folder, latent_sampling="sample")
  batches = _take(_stream(cfg, seed=0, batch=10), 40)  # 40 epochs of 10 examples
  normalised, first_epoch = [], None
  for epoch, batch in enumerate(batches):
    indices = pipeline.epoch_permutation(0, epoch, _N)
    np.testing.assert_array_equal(batch["label"], indices % 3)
    means = np.stack([_moments(i)[0, 0] for i in indices])
    stds = np.stack([_moments(i)[0, 1] for i in indices])
    normalised.append((batch["latent"] / _SCALE + _SHIFT - means) / stds)
    first_epoch = batch if first_epoch is None else first_epoch
  eps = np.concatenate(normalised).ravel()
  assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # 4,800 draws of N(0, 1)
  # The same example gets a fresh draw in every epoch.
  first_example = [pipeline.epoch_permutation(0, e, _N).tolist().index(0) for e in range(2)]
  assert not np.allclose(normalised[0][first_example[0]], normalised[1][first_example[1]])
  again = next(_stream(cfg, seed=0, batch=10))
  np.testing.assert_array_equal(again["latent"], first_epoch["latent"])  # a function of seed


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_count_does_not_change_the_global_batch(folder, process_count):
  cfg = _cfg(folder, random_flip=True)
  single = _take(_stream(cfg, seed=3, batch=8), 4)
  shards = [_take(_stream(cfg, 3, p, process_count, batch=8), 4) for p in range(process_count)]
  for step, batch in enumerate(single):
    for key in ("latent", "label"):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([shard[step][key] for shard in shards]))


def test_resume_from_iterator_state(folder):
  cfg = _cfg(folder, random_flip=True)
  original = _stream(cfg, seed=9)
  _take(original, 3)
  state = json.loads(json.dumps(original.get_state()))
  expected = _take(original, 3)
  resumed = _stream(cfg, seed=9, process_index=1, process_count=2)
  next(resumed)
  resumed.set_state(state)
  for got, want in zip(_take(resumed, 3), expected):
    np.testing.assert_array_equal(got["latent"], want["latent"][2:])


def test_bad_latents_settings_name_the_field(tmp_path, folder):
  with pytest.raises(ValueError, match="DataConfig.latents_dir"):
    data.DataConfig(source="latents")
  with pytest.raises(ValueError, match="DataConfig.latent_sampling"):
    dataclasses.replace(_cfg(folder), latent_sampling="mode")
  with pytest.raises(ValueError, match="latents.json"):
    data.dataset_info(_cfg(str(tmp_path)))
  unflipped = tmp_path / "unflipped"
  unflipped.mkdir()
  _write_folder(unflipped, variants=1)
  assert data.dataset_info(_cfg(str(unflipped))).num_examples == _N
  with pytest.raises(ValueError, match="random_flip"):
    data.dataset_info(_cfg(str(unflipped), random_flip=True))
  os.remove(unflipped / latents.shard_name(2, 3))
  with pytest.raises(ValueError, match="lacks the shards"):
    data.dataset_info(_cfg(str(unflipped)))
  with pytest.raises(ValueError, match="iterate_dataset"):
    next(data.iterate_dataset(_cfg(folder), batch_size=2))


@pytest.mark.slow
def test_worker_processes_do_not_change_latent_batches(folder):
  cfg = _cfg(folder, random_flip=True)
  with_workers = _stream(dataclasses.replace(cfg, num_workers=2), seed=1)
  try:
    batches = _take(with_workers, 4)
  finally:
    with_workers.close()
  for got, want in zip(batches, _take(_stream(cfg, seed=1), 4)):
    np.testing.assert_array_equal(got["latent"], want["latent"])


def _with_captions(path, contexts) -> str:
  """A latents folder with caption embeddings (label i % 3 is caption i % 3)."""
  _write_folder(path)
  info = json.loads((path / latents.INFO_FILE).read_text())
  info.update(captions=["c0", "c1", "c2"], context_shape=list(contexts.shape[1:]),
              text_encoder="pipeline")
  (path / latents.INFO_FILE).write_text(json.dumps(info))
  np.save(path / latents.CONTEXTS_FILE, contexts)
  return str(path)


def test_caption_embeddings_travel_with_their_latents_on_any_process_count(tmp_path):
  contexts = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)  # 3 + empty
  cfg = _cfg(_with_captions(tmp_path, contexts), random_flip=True)
  single = _take(_stream(cfg, seed=2, batch=4), 4)
  shards = [_take(_stream(cfg, 2, p, 2, batch=4), 4) for p in range(2)]
  for step, batch in enumerate(single):
    assert batch["context"].shape == (4, 5, 6) and batch["context"].dtype == np.float32
    np.testing.assert_array_equal(batch["context"], contexts[batch["label"]])
    for key in ("latent", "label", "context"):
      np.testing.assert_array_equal(batch[key],
                                    np.concatenate([shard[step][key] for shard in shards]))
  np.testing.assert_array_equal(latents.LatentSource(cfg.latents_dir, random_flip=False)
                                .contexts[-1], contexts[-1])  # the empty prompt's, last


def test_caption_embeddings_of_the_wrong_shape_or_missing_are_refused(tmp_path):
  path = _with_captions(tmp_path, np.zeros((3, 5, 6), np.float32))  # the empty prompt missing
  with pytest.raises(ValueError, match=r"contexts\.npy holds float32 \(3, 5, 6\).*\(4, 5, 6\)"):
    latents.LatentSource(path, random_flip=False)
  (tmp_path / latents.CONTEXTS_FILE).unlink()
  with pytest.raises(ValueError, match="contexts.npy"):
    latents.LatentSource(path, random_flip=False)
