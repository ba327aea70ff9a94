"""Exact verification of tiny ReLU networks by MILP (HiGHS; ``pip install 'certaudit[exact]'``).

* :mod:`.milp`: the network's big-M encoding and :func:`~.milp.min_margin` (ℓ∞ exact, ℓ2 through an
  outer polytope of the ball refined by cuts);
* :mod:`.ibp_milp`: the interval defense's own IBP bound as a function of the input, as a MILP;
* :mod:`.oracle`: exact certificates and exact degradability for the Lipschitz and interval defenses;
* :mod:`.encoding`, :mod:`.balls`: the MILP under construction, the ℓ2 ball as linear constraints.

Nothing here is imported by the rest of the package: ``highspy`` stays optional.
"""

from certaudit.verify.encoding import available

__all__ = ["available"]
