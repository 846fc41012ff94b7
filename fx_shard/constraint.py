"""ShardingConstraint: pin an activation's sharding where XLA's propagation should not choose."""

from __future__ import annotations

import torch
from torch import nn

from fx_shard.sharding import Spec

__all__ = ["ShardingConstraint"]


class ShardingConstraint(nn.Module):
    """Identity that marks its input's sharding on the XLA device.

    ``spec`` names the trailing dimensions (leading ones are replicated), so
    one constraint serves any batch rank; ``()`` means fully replicated.
    Until ``materialize`` gives it a mesh (and off XLA) it does nothing.
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = tuple(spec)
        self.mesh = None
        self.torch_xla_spec = self.spec
        self.mesh_text = ""

    def place(self, mesh) -> None:
        """Give the constraint its mesh (``materialize`` does), as torch_xla takes it (sub-axes resolved).

        The mesh's text is made here, outside any trace: dynamo cannot trace ``str(mesh)``.
        """
        from fx_shard.xla import mesh_for

        self.mesh, self.torch_xla_spec = mesh_for(mesh, self.spec)
        self.mesh_text = str(self.mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh is None or x.device.type != "xla":
            return x
        spec = (None,) * (x.dim() - len(self.torch_xla_spec)) + self.torch_xla_spec
        if torch.compiler.is_compiling():  # traced: torch_xla's op form, which dynamo and aot_autograd keep
            return torch.ops.xla.aot_mark_sharding(x, self.mesh_text, str(spec))
        import torch_xla.distributed.spmd as xs

        xs.mark_sharding(x, self.mesh, spec)
        return x

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
