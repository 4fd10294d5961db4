"""Built-in synthetic domains that conflict on the same inputs.

Every domain maps a random lowercase string ``x`` to ``y = rule(x)`` and is rendered as
``prompt = "x="``, ``response = "y\\n"``. The prompt carries no domain tag, so a model can only
tell the domains apart by what the data teaches it: two silos trained on opposing rules
(``shift_up`` vs ``shift_down``) over the same strings pull shared parameters in opposite
directions. That is the conflict the federated aggregation has to cope with, reproduced without
any external dataset.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fcmoe.errors import DataError

from .records import Example

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _shift(text: str, offset: int) -> str:
    """Caesar-shift lowercase letters, wrapping around; other characters are left as they are."""
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - ord("a") + offset) % 26 + ord("a")))
        else:
            out.append(ch)
    return "".join(out)


def shift_up(text: str) -> str:
    """Each letter +1 (``z`` wraps to ``a``)."""
    return _shift(text, 1)


def shift_down(text: str) -> str:
    """Each letter -1 (``a`` wraps to ``z``)."""
    return _shift(text, -1)


def copy(text: str) -> str:
    """The input unchanged."""
    return text


def reverse(text: str) -> str:
    """The input back to front."""
    return text[::-1]


def sort_asc(text: str) -> str:
    """Characters in ascending order."""
    return "".join(sorted(text))


def sort_desc(text: str) -> str:
    """Characters in descending order."""
    return "".join(sorted(text, reverse=True))


def upper(text: str) -> str:
    """Uppercase; disjoint output alphabet, so it conflicts with nothing."""
    return text.upper()


def double(text: str) -> str:
    """Each character twice (``ab`` -> ``aabb``)."""
    return "".join(ch * 2 for ch in text)


def rotate(text: str) -> str:
    """Rotate left by one (``abc`` -> ``bca``)."""
    return text[1:] + text[:1]


DOMAINS: dict[str, Callable[[str], str]] = {
    "shift_up": shift_up,
    "shift_down": shift_down,
    "copy": copy,
    "reverse": reverse,
    "sort_asc": sort_asc,
    "sort_desc": sort_desc,
    "upper": upper,
    "double": double,
    "rotate": rotate,
}

# Pairs whose rules disagree on (almost) every input: palindromes are the only strings where
# copy/reverse agree, and single-letter repeats the only ones where sort_asc/sort_desc agree.
CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    ("shift_up", "shift_down"),
    ("copy", "reverse"),
    ("sort_asc", "sort_desc"),
)

NEUTRAL_DOMAINS: tuple[str, ...] = ("upper", "double", "rotate")


def check_domain(domain: str) -> Callable[[str], str]:
    """Return the rule for ``domain`` or raise a DataError that lists the valid names."""
    try:
        return DOMAINS[domain]
    except KeyError:
        raise DataError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}") from None


def _check_lengths(min_len: int, max_len: int) -> None:
    if min_len < 1 or max_len < min_len:
        raise DataError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")


def random_inputs(n: int, seed: int, min_len: int = 4, max_len: int = 8) -> list[str]:
    """``n`` random lowercase strings with lengths in ``[min_len, max_len]``, fully fixed by ``seed``.

    Independent of any domain, which is what makes conflicting domains see identical inputs.
    """
    if n < 0:
        raise DataError(f"number of examples must be >= 0, got {n}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    _check_lengths(min_len, max_len)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    letters = rng.integers(0, len(_ALPHABET), size=(n, max_len))
    return ["".join(_ALPHABET[c] for c in row[:length]) for row, length in zip(letters, lengths)]


def render(domain: str, inputs: list[str]) -> list[Example]:
    """Apply ``domain``'s rule to given inputs in the shared ``x=`` / ``y\\n`` format."""
    rule = check_domain(domain)
    return [Example(prompt=f"{x}=", response=f"{rule(x)}\n", domain=domain) for x in inputs]


def generate(domain: str, n: int, seed: int, min_len: int = 4, max_len: int = 8) -> list[Example]:
    """``n`` examples of ``domain``; the same seed gives the same inputs for every domain."""
    check_domain(domain)
    return render(domain, random_inputs(n, seed, min_len, max_len))
