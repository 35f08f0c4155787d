"""Hyper-parameter search over a model's recipe with Optuna (the optional `search` extra):
`gpunet search`, or gpunet.search.search(recipe, model, trials, out, ...) from Python."""
from gpunet.search.space import DEFAULT_SPACES, TRAINING, default_space, load_space
from gpunet.search.study import MissingOptuna, search, trial_seed

__all__ = ["DEFAULT_SPACES", "MissingOptuna", "TRAINING", "default_space", "load_space", "search", "trial_seed"]
