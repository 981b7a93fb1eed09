"""FLOP counts: XLA's cost analysis, the model FLOPs of a jaxpr, and the chips' peaks (for MFU)."""

from __future__ import annotations


def xla_flops(compiled):
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort
        return None


def jaxpr_flops(jaxpr):
    """Multiply-add FLOPs (2 per MAC) of the convolutions and matmuls in a jaxpr, sub-jaxprs included
    (a scan's body counted `length` times). Backend-independent, unlike XLA's cost analysis, which
    does not count the convolutions that XLA:GPU hands to cuDNN."""
    import numpy as np
    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            kernel = np.prod([rhs[i] for i in dn.rhs_spec[2:]]) * rhs[dn.rhs_spec[1]]  # spatial x in-features
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * kernel
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([eqn.invars[0].aval.shape[d] for d in contract])
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, ClosedJaxpr):
                    total += times * jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    total += times * jaxpr_flops(sub)
    return total


def model_flops_per_step(graphdef, state, batch, config, info):
    """Model FLOPs of one training step: 3x the forward pass's convolution and matmul FLOPs (the
    backward pass costs about twice the forward), the usual convention for model FLOP utilisation."""
    import jax
    from flax import nnx

    from stepjax.train.step import model_inputs

    def forward(state, image):
        model = nnx.merge(graphdef, state.params, state.rest, copy=True)
        return model.solve(model_inputs(config, info, image))[0]

    return 3.0 * jaxpr_flops(jax.make_jaxpr(forward)(state, batch["image"]).jaxpr)


# dense peak FLOP/s per chip from the vendors' data sheets. "float32" is the TF32 tensor-core peak on
# NVIDIA parts: at jax's default precision, XLA lets cuDNN and cuBLAS run fp32 convolutions and matmuls
# in TF32, so that is the ceiling an fp32 step can reach.
PEAKS = {
    "H100": {"float32": 495e12, "bfloat16": 989e12},
    "H200": {"float32": 495e12, "bfloat16": 989e12},
    "A100": {"float32": 156e12, "bfloat16": 312e12},
    "L4": {"float32": 60e12, "bfloat16": 121e12},
    "TPU v4": {"float32": 275e12, "bfloat16": 275e12},
    "TPU v5 lite": {"float32": 197e12, "bfloat16": 197e12},
}


def peak_flops(kind, dtype):
    for name, peaks in PEAKS.items():
        if name.lower() in kind.lower():
            return peaks[dtype]
    return None
