"""optax_psf: sharpness-aware minimization that reuses the PSF to skip gradients."""

from optax_psf._src.metrics import find_state, metrics
from optax_psf._src.perturbation import Perturbation, sam_perturbation
from optax_psf._src.policy import (
    SamplingPolicy,
    VSamPolicyState,
    always_sample,
    never_sample,
    vsam_policy,
)
from optax_psf._src.reuse import DecayedPsfState, ReuseRule, decayed_psf, no_reuse
from optax_psf._src.statistics import PsfStatistics
from optax_psf._src.train_step import (
    HostPlan,
    StepOutput,
    TrainStep,
    default_path,
    make_train_step,
)
from optax_psf._src.transform import (
    STATIC_HYPERPARAMETERS,
    PsfReuseState,
    psf_reuse,
    sam,
    vsam,
)

__version__ = "0.1.0"

__all__ = [
    "STATIC_HYPERPARAMETERS",
    "DecayedPsfState",
    "HostPlan",
    "Perturbation",
    "PsfReuseState",
    "PsfStatistics",
    "ReuseRule",
    "SamplingPolicy",
    "StepOutput",
    "TrainStep",
    "VSamPolicyState",
    "always_sample",
    "decayed_psf",
    "default_path",
    "find_state",
    "make_train_step",
    "metrics",
    "never_sample",
    "no_reuse",
    "psf_reuse",
    "sam",
    "sam_perturbation",
    "vsam",
    "vsam_policy",
]
