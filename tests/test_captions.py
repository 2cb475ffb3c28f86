"""Image–caption folders (source "captions"): pairs, the caption table, the deterministic stream."""
import json

import numpy as np
from PIL import Image
import pytest

from jaxdiff import data
from jaxdiff.data import captions
from jaxdiff.data.sources import load_mnist_offline, mnist_offline_path

_CAPTIONS = ["a red square", "  a blue\n square ", "a red square", "a green  dot", "a dot",
             "a blue square", "a red square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Seven 8x8 RGB images, each filled with its index, in the root and a nested subfolder."""
  root = tmp_path_factory.mktemp("captions")
  (root / "more" / "deeper").mkdir(parents=True)
  for i, caption in enumerate(_CAPTIONS):
    where = root if i < 3 else root / "more" if i < 5 else root / "more" / "deeper"
    Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(where / f"img{i}.png")
    (where / f"img{i}.txt").write_text(caption, encoding="utf-8")
  (root / "notes.txt").write_text("a text file without an image is ignored")
  return str(root)


def _cfg(folder, **overrides):
  return data.DataConfig(**{"source": "captions", "folder": folder, "image_size": 8,
                            "num_threads": 2, **overrides})


def test_each_image_is_paired_with_its_own_caption(folder):
  source = captions.CaptionFolderSource(_cfg(folder))
  normalised = [" ".join(c.split()) for c in _CAPTIONS]
  assert source.captions == tuple(sorted(set(normalised)))
  assert len(source) == 7 and source.num_classes == 0 and source.channels == 3
  for index in range(7):
    item = source[index]
    fill = int(item["image"][0, 0, 0]) // 10  # which file it came from
    assert source.caption(index) == normalised[fill]
    assert source.captions[item["label"]] == normalised[fill]
    np.testing.assert_array_equal(item["image"], np.full((8, 8, 3), 10 * fill, np.uint8))
  assert data.dataset_info(_cfg(folder)) == data.DatasetInfo(8, 3, 0, 7)


def test_an_image_without_its_caption_file_is_named(tmp_path):
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "a.txt").write_text("a")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.png")
  with pytest.raises(ValueError, match=r"b\.png has no caption file .*b\.txt"):
    captions.CaptionFolderSource(_cfg(str(tmp_path)))
  with pytest.raises(data.DatasetNotFoundError, match="DataConfig.folder"):
    captions.CaptionFolderSource(_cfg(str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="DataConfig.folder must be set"):
    data.DataConfig(source="captions")


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_the_stream_does_not_depend_on_the_process_count_and_resumes(folder, process_count):
  cfg = _cfg(folder, random_flip=True)
  stream = lambda p=0, n=1: data.make_train_iterator(cfg, global_batch_size=4, seed=5,
                                                     process_index=p, process_count=n)
  single = _take(stream(), 5)  # more than two epochs of 7
  shards = [_take(stream(p, process_count), 5) for p in range(process_count)]
  for step, batch in enumerate(single):
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key],
                                    np.concatenate([s[step][key] for s in shards]))
  resumed = stream()
  resumed.set_state(json.loads(json.dumps({**stream().get_state(), "next_batch": 3})))
  for got, want in zip(_take(resumed, 2), single[3:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_offline_digits_are_written_with_their_captions(tmp_path):
  paths = captions.write_digit_captions(str(tmp_path), count=12)
  images, labels, _ = load_mnist_offline(mnist_offline_path())
  source = captions.CaptionFolderSource(_cfg(str(tmp_path), channels=1, image_size=28))
  assert [source.paths[i] for i in range(12)] == paths
  # The file is sorted by class; the folder takes the classes in turn: 0..9, then 0, 1.
  order = [500 * d for d in range(10)] + [1, 501]
  np.testing.assert_array_equal(labels[order], [*range(10), 0, 1])
  for index in range(12):
    assert source.caption(index) == f"a handwritten digit {labels[order[index]]}"
    np.testing.assert_array_equal(source[index]["image"], images[order[index]])
