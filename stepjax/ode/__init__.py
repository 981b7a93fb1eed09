"""The numerical core: step-size controllers and explicit Euler stages (no image specifics)."""

from stepjax.ode.controller import (
    ConstantStepSize,
    ControllerState,
    LearnedStepSize,
    StageShared,
    StepController,
    StepSchedule,
)
from stepjax.ode.diffrax_bridge import DiffraxStepController
from stepjax.ode.euler import EulerStage, EulerStep, StageOutput, StepProposal, build_stacked

__all__ = [
    "ConstantStepSize",
    "ControllerState",
    "DiffraxStepController",
    "EulerStage",
    "EulerStep",
    "LearnedStepSize",
    "StageOutput",
    "StageShared",
    "StepController",
    "StepProposal",
    "StepSchedule",
    "build_stacked",
]
