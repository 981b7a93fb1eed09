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
from stepjax.analysis.metrics import (
    StatsOptions,
    curve_statistics,
    gate_partial_correlation,
    representational_ability,
    resolvable_permutations,
    step_size_statistics,
)
from stepjax.analysis.report import (
    Analysed,
    analyse,
    build_report,
    load_images,
    load_source,
    mean_gate_test,
    render_report,
    write_report,
)
from stepjax.analysis.stats import (
    CorrelationTest,
    McNemar,
    bootstrap_interval,
    coefficient_of_variation,
    correlation_test,
    holm,
    mcnemar_exact,
    spearman,
)
from stepjax.analysis.trace import (
    DEFAULT_NSI,
    GATE_INPUTS,
    INDICATORS,
    StageTrace,
    Trace,
    TraceOptions,
    block_indicators,
    gate_input_statistics,
    trace_model,
)

__all__ = [
    "DEFAULT_NSI",
    "GATE_INPUTS",
    "INDICATORS",
    "Analysed",
    "CorrelationTest",
    "McNemar",
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
    "gate_input_statistics",
    "gate_partial_correlation",
    "heun_error",
    "holm",
    "implied_step",
    "linearised_field",
    "load_images",
    "load_source",
    "mcnemar_exact",
    "mean_gate_test",
    "relative_increment",
    "representational_ability",
    "resolvable_permutations",
    "sample_norm",
    "secant_lipschitz",
    "spearman",
    "spectral_radius",
    "step_size_statistics",
    "trace_model",
    "render_report",
    "write_report",
]
