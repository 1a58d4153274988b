"""Config file for train.py in tests: ``--config tests/tiny_config.py:ROOT``."""

from tests import helpers


def get_config(dataset_root):
  return helpers.tiny_config(dataset_root)
