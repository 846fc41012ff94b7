"""Sharding styles, one unit each: ``get("colwise")``, ``for_class(module)``, ``from_hf("rowwise_rep")``.

Importing this package registers the built-in styles, in this order (the
order error messages list them in). A style defined anywhere else registers
itself the same way, by subclassing ``Style`` with a ``name``.
"""

from fx_shard.styles.base import LayerPlan, Style, for_class, from_hf, get, names, registered

# Defining a style registers it, so this order is the order styles are listed in.
# isort: off
from fx_shard.styles.colwise import Colwise
from fx_shard.styles.rowwise import Rowwise
from fx_shard.styles.qkv import QKV
from fx_shard.styles.merged_colwise import MergedColwise
from fx_shard.styles.vocab import Vocab
from fx_shard.styles.lm_head import LMHead
from fx_shard.styles.replicate import Replicate
# isort: on

__all__ = [
    "STYLES",
    "QKV",
    "Colwise",
    "LMHead",
    "LayerPlan",
    "MergedColwise",
    "Replicate",
    "Rowwise",
    "Style",
    "Vocab",
    "for_class",
    "from_hf",
    "get",
    "names",
    "registered",
]

#: The built-in styles' names (``names()`` also lists styles defined since).
STYLES: tuple[str, ...] = names()
