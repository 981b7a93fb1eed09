"""The numerical core: step-size controllers and explicit Euler stages (no image specifics)."""

from stepjax.ode.controller import (
    ConstantStepSize,
    ControllerState,
    ErrorStepController,
    LearnedStepSize,
    StageShared,
    StepAttempt,
    StepController,
    StepSchedule,
    scaled_norm,
)
from stepjax.ode.diffrax_bridge import DiffraxErrorController, DiffraxStepController
from stepjax.ode.euler import EulerStage, EulerStep, StageOutput, StepProposal, build_stacked

__all__ = [
    "ConstantStepSize",
    "ControllerState",
    "DiffraxErrorController",
    "DiffraxStepController",
    "ErrorStepController",
    "EulerStage",
    "EulerStep",
    "LearnedStepSize",
    "StageOutput",
    "StageShared",
    "StepAttempt",
    "StepController",
    "StepProposal",
    "StepSchedule",
    "build_stacked",
    "scaled_norm",
]
