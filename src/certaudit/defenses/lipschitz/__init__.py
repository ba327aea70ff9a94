"""Lipschitz-margin certification (GloRo Nets) with certified layer bounds, and GloRo training.

* :class:`LipschitzDefense` -- ``certify`` / ``accept`` / ``margin`` / ``gloro_logits`` and
  ``lipschitz_constants()`` for feed-forward Normalize / Conv2d / Linear / ReLU / Flatten networks;
* :mod:`.bounds` -- certified spectral-norm upper bounds (circulant Gram and Lanczos + Cholesky);
* :data:`GLORO_METHOD` -- the ``gloro`` training method (``certaudit train --method gloro``).

See ``docs/lipschitz.md``.
"""

from certaudit.defenses.lipschitz.defense import LayerBound, LipschitzDefense, LipschitzReport, certified_report
from certaudit.defenses.lipschitz.gloro import GLORO_METHOD, GloroMethod, PowerIterationEstimator

__all__ = ["LipschitzDefense", "LipschitzReport", "LayerBound", "certified_report", "GLORO_METHOD", "GloroMethod",
           "PowerIterationEstimator"]
