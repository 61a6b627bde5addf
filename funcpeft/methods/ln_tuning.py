"""LN tuning (`LNTuningConfig`): each targeted module trains a copy of its own parameters.

PEFT deep-copies every targeted module (LayerNorm / RMSNorm by default, but any module may be targeted) and
runs the copy instead of the original. funcpeft's adapter tree holds exactly what PEFT trains: for each
target, copies of the module's parameters (`{"weight": ..., "bias": ...}`), which replace the originals in
the call (no per-layer op, nothing materialised), are written in on merge (PEFT swaps the modules), and are
counted like modules_to_save copies (original and copy). PEFT saves them as
`base_model.model.{path}.ln_tuning_layers.{param}`. The copies keep the module's dtype (PEFT skips the
adapter autocast). One LN tuning adapter per call or merge, like PEFT.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..configs import LNTuningConfig
from ._registry import register
from .base import KeyRules, Method


def _no_layer_op(*args: Any) -> NoReturn:
    raise NotImplementedError("LN tuning replaces whole modules' parameters: it has no per-layer op")


LN_TUNING = register(
    Method(
        name="ln_tuning",
        config=LNTuningConfig,
        hyper=_no_layer_op,
        param_names=_no_layer_op,
        init=_no_layer_op,
        forward=_no_layer_op,
        keys=KeyRules(param_prefix="ln_tuning_", unsuffixed=frozenset(), copies_part="ln_tuning_layers"),
    )
)
