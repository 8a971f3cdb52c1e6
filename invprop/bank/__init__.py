"""The sharded memory bank (docs/DESIGN.md, "The sharded bank"): storage and update (`storage`), the local top-M
strategies (`select/`), `auto` (`autotune`) and the cross-rank reductions (`reductions`)."""

from invprop.bank.reductions import logsumexp_across_ranks, masked_logsumexp
from invprop.bank.select import SELECTIONS, SelectSettings
from invprop.bank.storage import ShardedBank, TopCandidates, init_rows
from invprop.data.order import shard_bounds

__all__ = ["SELECTIONS", "SelectSettings", "ShardedBank", "TopCandidates", "init_rows", "logsumexp_across_ranks",
           "masked_logsumexp", "shard_bounds"]
