"""stepjax: residual networks as explicit Euler solvers, attention modules as step-size
controllers, and StepNet (our reconstruction of Huang et al., ICCV 2023)."""

from stepjax import controllers, models, ode
from stepjax.controllers import CONTROLLERS, make_controller
from stepjax.models import PRESETS, ResNet, build_model, count_params, make_model
from stepjax.ode import ConstantStepSize, EulerStage, EulerStep, LearnedStepSize, StepController, StepSchedule

__all__ = [
    "CONTROLLERS",
    "PRESETS",
    "ConstantStepSize",
    "EulerStage",
    "EulerStep",
    "LearnedStepSize",
    "ResNet",
    "StepController",
    "StepSchedule",
    "build_model",
    "controllers",
    "count_params",
    "make_controller",
    "make_model",
    "models",
    "ode",
]
