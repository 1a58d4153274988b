"""The tests' tiny config, also a config file for train.py in tests:
``--config tests/tiny_config.py:ROOT``.

It imports nothing but the default config, so that a train.py subprocess
that must fail on a bad flag or key fails without loading the trainer.
"""

from configs import default


def tiny_config(dataset_root, **overrides):
  """A config that trains in seconds on 24^3 phantoms; keys are dotted."""
  config = default.get_config()
  config.data.root = str(dataset_root)
  config.data.num_val_cases = 1
  config.data.patch_shape = (16, 16, 16)
  config.model.base_features = 4
  config.model.depth = 2
  # Off unless a test is about it: tracing and compiling the augmentation
  # costs more than the rest of the tiny train step.
  config.augment.enabled = False
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 4
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 0
  config.train.checkpoint_every = 2
  config.inference.window = (16, 16, 16)
  config.inference.batch_size = 4
  return override(config, **overrides)


def override(config, **dotted):
  """Sets ``config``'s keys given as dotted names ("train.num_steps")."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def get_config(dataset_root):
  return tiny_config(dataset_root)
