"""ShardingConstraint: pin an activation's sharding where XLA's propagation should not choose."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fx_shard.axes import Spec

__all__ = ["ShardingConstraint"]


class ShardingConstraint(nn.Module):
    """Identity that marks its input's sharding on the XLA device.

    ``spec`` names the trailing dimensions (leading ones are replicated), so
    one constraint serves any batch rank; ``()`` means fully replicated.
    Until ``fx_shard.xla.place_constraint`` gives it a mesh (and off XLA) it
    does nothing; the marking itself is the XLA door's, so this module
    never imports torch_xla.
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = tuple(spec)
        self.mesh = None
        self.torch_xla_spec = self.spec
        self.mesh_text = ""
        self.marker: Callable | None = None

    def place(self, mesh, torch_xla_spec: Spec, mesh_text: str, marker: Callable) -> None:
        """Give the constraint its mesh, its spec as torch_xla takes it, the mesh's text and the marking call."""
        self.mesh, self.torch_xla_spec, self.mesh_text, self.marker = mesh, tuple(torch_xla_spec), mesh_text, marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh is None or x.device.type != "xla":
            return x
        spec = (None,) * (x.dim() - len(self.torch_xla_spec)) + self.torch_xla_spec
        return self.marker(x, self.mesh, self.mesh_text, spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
