"""Where experience comes from: the Procgen vector env, sequence replay and the ReplayDataModule."""
