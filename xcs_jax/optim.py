"""Optimization of compound AI programs with optax.

Step functions for hybrid losses, minibatching, a training loop with a
progress bar and early stopping, checkpoints, and score-function (REINFORCE)
gradients for discrete choices. See docs/optimization.md.
"""
from xcs_jax._src.optim.checkpoint import restore
from xcs_jax._src.optim.checkpoint import save
from xcs_jax._src.optim.data import minibatches
from xcs_jax._src.optim.early_stopping import EarlyStopping
from xcs_jax._src.optim.early_stopping import EarlyStoppingState
from xcs_jax._src.optim.early_stopping import early_stopping
from xcs_jax._src.optim.loop import FitResult
from xcs_jax._src.optim.loop import fit
from xcs_jax._src.optim.reinforce import ReinforceOutput
from xcs_jax._src.optim.reinforce import greedy_choice
from xcs_jax._src.optim.reinforce import log_prob
from xcs_jax._src.optim.reinforce import reinforce
from xcs_jax._src.optim.reinforce import sample_choices
from xcs_jax._src.optim.reinforce import score_function_loss
from xcs_jax._src.optim.step import StepOutput
from xcs_jax._src.optim.step import make_step

__all__ = [
    "EarlyStopping",
    "EarlyStoppingState",
    "FitResult",
    "ReinforceOutput",
    "StepOutput",
    "early_stopping",
    "fit",
    "greedy_choice",
    "log_prob",
    "make_step",
    "minibatches",
    "reinforce",
    "restore",
    "sample_choices",
    "save",
    "score_function_loss",
]
