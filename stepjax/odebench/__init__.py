"""Work-precision benchmark of a learned step-size controller against diffrax's PID family.

See `docs/ODE_BENCH.md` (part A) for the design and `python -m stepjax.odebench` for the
study itself.
"""

from .benchmark import FULL, QUICK, BenchConfig, run, write_outputs
from .controllers import CLASSICAL, PIDGains, classical_gains, training_score, tune_pid
from .learned import LearnedController, LearnedPolicy, init_network, oracle_log_steps, train_imitation
from .problems import FAMILIES, Family, Problem, get_family
from .reference import ANCHORS, cache_dir, check_anchor, reference_solution
from .solve import COUNTER, EvaluationCounter, SolveStats, explicit_nfe, solve
from .workprecision import Curve, cost_at_error, cost_ratio, error_levels, global_error, measure_curve

__all__ = [
    "ANCHORS",
    "CLASSICAL",
    "COUNTER",
    "FAMILIES",
    "FULL",
    "QUICK",
    "BenchConfig",
    "Curve",
    "EvaluationCounter",
    "Family",
    "LearnedController",
    "LearnedPolicy",
    "PIDGains",
    "Problem",
    "SolveStats",
    "cache_dir",
    "check_anchor",
    "classical_gains",
    "cost_at_error",
    "cost_ratio",
    "error_levels",
    "explicit_nfe",
    "get_family",
    "global_error",
    "init_network",
    "measure_curve",
    "oracle_log_steps",
    "reference_solution",
    "run",
    "solve",
    "train_imitation",
    "training_score",
    "tune_pid",
    "write_outputs",
]
