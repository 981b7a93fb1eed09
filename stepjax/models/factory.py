"""The model a run config describes: the one place where a config's ``model`` group becomes a
`ResNet` (training, evaluation, analysis and the benchmarks all build it here)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from stepjax.models.resnet import RandomPlacement, ResNet, get_spec, make_model, resolve_placement

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NSI_PREFIX = "nsi:"  # model.placement = 'nsi:REF': the blocks of largest NSI of the reference run REF


def is_nsi_placement(placement) -> bool:
    """Whether a config's ``model.placement`` is an NSI-guided ``'nsi:REF'``, which the command
    resolves to a block list before the model is built."""
    return isinstance(placement, str) and placement.startswith(NSI_PREFIX)


def build_model(config: ml_collections.ConfigDict) -> ResNet:
    """The model of a run config, freshly initialised from ``config.seed``.

    **Arguments:**

    - `config`: an experiment or run config (its ``model`` group, ``data.num_classes`` and
      ``seed``). ``model.placement`` is ``'all'``, ``'none'``, ``'random'`` or an explicit block
      list; an NSI-guided ``'nsi:REF'`` is resolved to its block list by the command that asks
      for it, before the model is built (`stepjax.analysis.placement.resolve_nsi_placement`).

    **Returns:**

    A `ResNet`.
    """
    m = config.model
    return make_model(
        m.preset, num_classes=config.data.num_classes, controller=m.controller,
        controller_options=dict(m.controller_options), placement=_placement(m), seed=config.seed,
        dtype=DTYPES[m.dtype], scan=m.scan, depths=m.depths, widths=m.widths, stem_width=m.stem_width,
        zero_init_residual=m.zero_init_residual,
    )


def placement_masks(model_config: ml_collections.ConfigDict) -> tuple[tuple[bool, ...], ...]:
    """Per-stage masks of the blocks where a config's ``model`` group puts its controller, as
    `build_model` places it (`resolve_placement` on the preset's depths)."""
    m = model_config
    return resolve_placement(_placement(m), get_spec(m.preset, depths=m.depths).depths)


def _placement(m: ml_collections.ConfigDict):
    """``model.placement`` as `resolve_placement` takes it: ``'random'`` with its
    ``placement_ratio`` and ``placement_seed`` becomes a `RandomPlacement`."""
    if m.placement == "random":
        return RandomPlacement(m.placement_ratio, m.placement_seed)
    return list(m.placement) if isinstance(m.placement, (tuple, list)) else m.placement
