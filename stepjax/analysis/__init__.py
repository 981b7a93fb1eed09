"""Stiffness analysis of residual networks read as explicit Euler solvers.

Per sample and per block: the NSI candidates (relative increment, secant Lipschitz estimate,
spectral radius of the vector field's Jacobian, Euler-vs-Heun local error and the classical step
it implies), the step sizes the controller chose, and how well those steps track the indicators
(the representational-ability metric, ours). See ``docs/ANALYSIS.md``. StepNet is our
reconstruction; the NSI formula and the metric are our choices among PAPER.md's candidates.

It reads trained runs (`stepjax.train`) and is imported by nothing below it; matplotlib is
imported only when a figure is drawn.
"""

from stepjax.analysis.indicators import (
    heun_error,
    implied_step,
    linearised_field,
    relative_increment,
    sample_norm,
    secant_lipschitz,
    spectral_radius,
)
from stepjax.analysis.metrics import StatsOptions, curve_statistics, representational_ability, step_size_statistics
from stepjax.analysis.report import Analysed, analyse, build_report, load_images, load_source, write_report
from stepjax.analysis.stats import (
    CorrelationTest,
    bootstrap_interval,
    coefficient_of_variation,
    correlation_test,
    spearman,
)
from stepjax.analysis.trace import (
    DEFAULT_NSI,
    INDICATORS,
    StageTrace,
    Trace,
    TraceOptions,
    block_indicators,
    trace_model,
)

__all__ = [
    "DEFAULT_NSI",
    "INDICATORS",
    "Analysed",
    "CorrelationTest",
    "StageTrace",
    "StatsOptions",
    "Trace",
    "TraceOptions",
    "analyse",
    "block_indicators",
    "bootstrap_interval",
    "build_report",
    "coefficient_of_variation",
    "correlation_test",
    "curve_statistics",
    "heun_error",
    "implied_step",
    "linearised_field",
    "load_images",
    "load_source",
    "relative_increment",
    "representational_ability",
    "sample_norm",
    "secant_lipschitz",
    "spearman",
    "spectral_radius",
    "step_size_statistics",
    "trace_model",
    "write_report",
]
