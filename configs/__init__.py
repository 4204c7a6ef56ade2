"""The configs (`get_config()` of each file). A task's reference config (`task.CONFIG`) also has a seconds-long
variant, ``--config configs/<file>.py:tiny`` (tiny data, a narrow model): the reliability tests run every task
of `lungct.tasks.TASKS` through it."""


def variant(config, name: str, tiny: dict):
  """``config`` as is (``name`` empty) or with the ``tiny`` overrides (dotted keys) applied; else ValueError."""
  if not name:
    return config
  if name != "tiny":
    raise ValueError(f"unknown config variant {name!r} (known: tiny)")
  from lungct import config_check
  return config_check.apply_overrides(config, tiny)
