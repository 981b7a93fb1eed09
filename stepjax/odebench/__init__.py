"""Work-precision benchmark of a learned step-size controller against diffrax's PID family.

The learned controller (`ResidualPIDController`: PI34 times a small network) is a
`stepjax.ode.ErrorStepController` and runs in diffrax through `stepjax.ode.DiffraxStepController`,
as the networks' controllers do. `python -m stepjax.odebench` trains it, tunes a PID on the same
budget, measures every controller on held-out problems, and files the record under
`results/odebench/`; `--report-only` rebuilds `docs/ODE_BENCH_RESULTS.md` from that record.
"""

from .benchmark import FULL, QUICK, BenchConfig, policy_file, run, write_records
from .imitation import ImitationConfig, TrainResult, train_imitation
from .learned import FEATURES, MLP, LearnedPolicy, ResidualPIDController, init_network
from .oracle import oracle_log_steps
from .pid import PID_BASELINES, PIDGains, pid_gains, training_score, tune_pid
from .problems import FAMILIES, Family, Problem, get_family
from .reference import ANCHORS, cache_dir, check_anchor, reference_solution
from .report import regenerate, rejudge
from .solve import COUNTER, EvaluationCounter, SolveStats, explicit_nfe, solve
from .workprecision import Curve, cost_at_error, cost_ratio, error_levels, global_error, measure_curve

__all__ = [
    "ANCHORS",
    "COUNTER",
    "FAMILIES",
    "FEATURES",
    "FULL",
    "MLP",
    "PID_BASELINES",
    "QUICK",
    "BenchConfig",
    "Curve",
    "EvaluationCounter",
    "Family",
    "ImitationConfig",
    "LearnedPolicy",
    "PIDGains",
    "Problem",
    "ResidualPIDController",
    "SolveStats",
    "TrainResult",
    "cache_dir",
    "check_anchor",
    "cost_at_error",
    "cost_ratio",
    "error_levels",
    "explicit_nfe",
    "get_family",
    "global_error",
    "init_network",
    "measure_curve",
    "oracle_log_steps",
    "pid_gains",
    "policy_file",
    "reference_solution",
    "regenerate",
    "rejudge",
    "run",
    "solve",
    "train_imitation",
    "training_score",
    "tune_pid",
    "write_records",
]
