"""Stable seed derivation shared by the data order and the augmentations.

Python's ``hash`` is salted for strings and torch's default generator is global state; neither survives a
restart reliably. Every random draw of the data path is instead seeded from a pure function of integers
(run seed, epoch, sample index, ...), so a resumed run replays exactly the same pixels and order.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser: cheap, well-mixed, and fully specified (no library/version dependence).
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into a seed in ``[0, 2**63)`` (valid for ``torch.Generator.manual_seed``).

    The order of ``parts`` matters, and (a, b) never collides trivially with (b, a) or (a + b,).
    """
    h = 0x243F6A8885A308D3  # arbitrary non-zero start so derive_seed() != derive_seed(0)
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1
