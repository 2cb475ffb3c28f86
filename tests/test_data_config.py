"""Tests of jaxdiff.data.config: a bad setting is a one-line error naming the field."""
import dataclasses

import pytest

from jaxdiff import data


@pytest.mark.parametrize("field,value", [
    ("source", "webdataset"), ("image_size", 0), ("channels", 2), ("fit", "crop"),
    ("num_workers", -1), ("num_threads", 1.5), ("prefetch", 0), ("random_flip", "yes"),
    ("split", ""), ("download", 1)])
def test_bad_config_field_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    dataclasses.replace(data.DataConfig(), **{field: value})


def test_bad_source_settings_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="DataConfig.name"):
    data.DataConfig(source="tfds")
  with pytest.raises(ValueError, match="DataConfig.folder"):
    data.DataConfig(source="folder")
  with pytest.raises(ValueError, match="DataConfig.folder"):
    data.dataset_info(data.DataConfig(source="folder", folder=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="divisible"):
    data.make_train_iterator(data.DataConfig(), global_batch_size=10, seed=0, process_index=0,
                             process_count=4)
