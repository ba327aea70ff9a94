"""The protocol rule, checked on the source: attacks, audits and commands talk to defenses through
the declared protocol only (no signature sniffing, no attribute probing, no private members, no
defense-name string compares outside the registry)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "certaudit"

FORBIDDEN = [
    (re.compile(r"\binspect\.signature\b"), "signature sniffing"),
    (re.compile(r"\b(hasattr|getattr)\(\s*(guard|defense|self\.defense)\b"), "attribute probing of a defense"),
    (re.compile(r"\b(guard|defense|self\.defense)\._[a-z]"), "a defense's private member"),
    (re.compile(r"""(==|!=)\s*["'](smoothing|lipschitz|interval)["']|["'](smoothing|lipschitz|interval)["']\s*(==|!=)"""),
     "a defense-name compare"),
    (re.compile(r"""in\s*\(\s*["'](smoothing|lipschitz|interval)["']"""), "a hard-coded defense list"),
]

# the registry maps names to classes; a defense module may use its own members
ALLOWED = {"defenses/registry.py"}


def _offenders():
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in ALLOWED:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            for pattern, what in FORBIDDEN:
                if pattern.search(code):
                    out.append(f"{rel}:{lineno}: {what}: {line.strip()}")
    return out


def test_no_caller_sniffs_a_defense():
    assert _offenders() == []


def test_the_lint_catches_what_it_names(tmp_path):
    bad = [
        'params = inspect.signature(defense.certify).parameters',
        'if hasattr(guard, "settings"):',
        'state = defense._state(shape)',
        'if name == "interval":',
        'if defense.lower() not in ("smoothing", "lipschitz"):',
    ]
    for line in bad:
        assert any(p.search(line) for p, _ in FORBIDDEN), line
