"""Apply the recipe's layout: decide which linears become integer and with what spec.

Before: linears with role and region.
After:  LinearInfo.spec is the recipe's QuantSpec for every (region, role) the layout makes integer, None otherwise
        (and for module paths the recipe skips); a linear listed in recipe.weight_bits (layout "auto") gets that
        weight width, or stays float at 16; recipe.backbone_a_bits sets the backbone's activation width. The graph is
        unchanged.
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.meta import update
from qvla_compiler.passes import _graph as g
from qvla_compiler.recipes import QuantRecipe


def apply_layout(gm: fx.GraphModule, recipe: QuantRecipe) -> fx.GraphModule:
    integer = recipe.integer_pairs()
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        skipped = any(info.module_path == p or info.module_path.startswith(p + ".") for p in recipe.skip)
        wanted = (info.region, info.role) in integer and not skipped
        update(node, spec=recipe.spec_for(info.module_path, info.region) if wanted else None)
    return gm
