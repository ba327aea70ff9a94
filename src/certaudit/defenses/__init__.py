"""Certified run-time defenses behind one protocol (see :mod:`certaudit.defenses.base`)."""

from certaudit.defenses.base import ABSTAIN, Certificates, Defense, Norm

__all__ = ["ABSTAIN", "Certificates", "Defense", "Norm"]
