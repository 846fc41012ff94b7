"""fx_shard.fused: the part layout of fused layers shared by the passes."""

import torch

from fx_shard.fused import join_parts, split_parts


def test_join_and_split_parts_are_inverse():
    fused = torch.arange(2 * 12 * 3).reshape(2, 12, 3)
    for dim in (1, -2):
        parts = split_parts(fused, [8, 2, 2], groups=2, dim=dim)
        assert [p.shape[1] for p in parts] == [8, 2, 2]
        assert torch.equal(parts[1], torch.cat([fused[:, 4:5], fused[:, 10:11]], 1))
        assert torch.equal(join_parts(parts, groups=2, dim=dim), fused)
