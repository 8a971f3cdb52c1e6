"""What each training objective needs from the rest of a run, stated once per method.

The trainer and the config checks read a `Method` instead of switching on `method.name`: whether it keeps InvP's
neighbour graph, the background size M it uses for N training images, and how its loss is built. (A checkpoint
must match the whole method section: invprop/config/identity.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from invprop.bank import ShardedBank
from invprop.config.schema import InvpConfig, MethodConfig, MethodName
from invprop.graph import NeighbourGraph
from invprop.loss import InvPLoss, NPIDLoss

Criterion = InvPLoss | NPIDLoss


@dataclass(frozen=True)
class Method:
    name: MethodName
    uses_graph: bool  # keeps the k-NN graph InvP propagates over (a checkpoint part of its own)
    background: Callable[[Any, int], int]  # (section, N) -> M, the background neighbours per anchor
    build_loss: Callable[[Any, ShardedBank, NeighbourGraph | None, int], Criterion]

    def criterion(self, section: MethodConfig, bank: ShardedBank, graph: NeighbourGraph | None,
                  n_train: int) -> Criterion:
        return self.build_loss(section, bank, graph, self.background(section, n_train))


def _npid_loss(section: MethodConfig, bank: ShardedBank, graph: NeighbourGraph | None, m: int) -> NPIDLoss:
    return NPIDLoss(bank, tau=section.tau, bank_momentum=section.bank_momentum)


def _invp_loss(section: InvpConfig, bank: ShardedBank, graph: NeighbourGraph | None, m: int) -> InvPLoss:
    return InvPLoss(bank, graph, tau=section.tau, n_background=m, n_pos=section.n_pos, layers=section.l,
                    lambda_inv=section.lambda_inv, warmup_epochs=section.warmup_epochs,
                    propagation=section.propagation, positives=section.positives, denominator=section.denominator,
                    bank_momentum=section.bank_momentum, edges=section.edges)


def _invp_background(section: InvpConfig, n_train: int) -> int:
    """M: the configured value, or min(4096, N) when left null."""
    return min(4096, n_train) if section.n_background is None else section.n_background


METHODS: dict[MethodName, Method] = {
    # NPID's softmax is over all N rows
    MethodName.npid: Method(MethodName.npid, uses_graph=False,
                            background=lambda section, n: n, build_loss=_npid_loss),
    MethodName.invp: Method(MethodName.invp, uses_graph=True,
                            background=_invp_background, build_loss=_invp_loss),
}


def method_of(section: MethodConfig) -> Method:
    """The spec of the configured method."""
    return METHODS[MethodName(section.name)]
