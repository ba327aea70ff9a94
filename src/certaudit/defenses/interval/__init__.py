"""Interval (IBP) and linear-relaxation (CROWN, CROWN-IBP) ℓ∞ certification, training and imports.

* :class:`IntervalDefense` -- the defense protocol (certify / accept / margin) on these bounds;
* :mod:`.bounds` -- the bound computations (batched, floating-point safe), for a closed set of
  layers compiled by :mod:`.ops`;
* :data:`CROWN_IBP`, :data:`IBP` -- training methods for ``certaudit train`` (``crown-ibp``, ``ibp``);
* :func:`convert_kw` / :func:`import_kw` -- the published Wong & Kolter models as certaudit models.

See ``docs/interval.md``.
"""

from certaudit.defenses.interval.bounds import (
    METHODS, compile_network, layer_bounds, logit_bounds, margin_bounds, spec_bounds, specification,
)
from certaudit.defenses.interval.defense import IntervalDefense
from certaudit.defenses.interval.kw import convert_kw, import_kw
from certaudit.defenses.interval.training import CROWN_IBP, IBP, IntervalTraining

__all__ = [
    "IntervalDefense", "METHODS", "compile_network", "margin_bounds", "logit_bounds", "layer_bounds",
    "spec_bounds", "specification", "convert_kw", "import_kw", "CROWN_IBP", "IBP", "IntervalTraining",
]
