"""fx_shard.axes: mesh-axis arithmetic shared by the passes."""

from fx_shard.axes import axis_size, fitting_axes, local_shape


def test_fitting_axes_takes_whole_axes_then_a_block_of_the_next():
    assert fitting_axes(("tp",), 8, {"tp": 8}) == ("tp",)
    assert fitting_axes(("tp",), 2, {"tp": 8}) == ("tp:2",)
    assert fitting_axes(("tp",), 6, {"tp": 8}) == ("tp:2",)  # the largest block count both divide
    assert fitting_axes(("tp",), 3, {"tp": 8}) == ()
    assert fitting_axes(("tp",), 2, {"tp": 8}, partial=False) == ()
    assert fitting_axes(("kv", "tp"), 2, {"kv": 2, "tp": 4}) == ("kv",)
    assert fitting_axes(("kv", "tp"), 4, {"kv": 2, "tp": 4}) == ("kv", "tp:2")
    assert axis_size({"kv": 2, "tp": 8}, ("kv", "tp:2")) == 4
    assert local_shape((16, 64), ("tp:2", None), {"tp": 8}) == (8, 64)
