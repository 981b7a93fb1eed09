"""The numerical core: step-size controllers and explicit Euler stages (no image specifics)."""

from stepjax.ode.controller import (
    ChannelGate,
    ConstantStepSize,
    ControllerState,
    ErrorStepController,
    LearnedStepSize,
    StageShared,
    StepAttempt,
    StepController,
    StepSchedule,
    as_channel_step,
    scaled_norm,
    spatial_mean,
)
from stepjax.ode.diffrax_bridge import DiffraxErrorController, DiffraxStepController
from stepjax.ode.euler import ChannelAffine, EulerStage, EulerStep, StageOutput, StepProposal, build_stacked

__all__ = [
    "ChannelAffine",
    "ChannelGate",
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
    "as_channel_step",
    "build_stacked",
    "scaled_norm",
    "spatial_mean",
]
