"""torch.nn's attention and transformer layers traced in their traceable forms (fx_shard.capture_nn)."""

import pytest
import torch
from torch import nn

import fx_shard
from fx_shard.capture import KEPT_WHOLE_KEY, capture, capture_parts


class SelfAttention(nn.Module):
    """x -> nn.MultiheadAttention(x, x, x), as torchvision's ViT calls it."""

    def __init__(self, batch_first: bool, dropout: float = 0.0, **call) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, dropout=dropout, batch_first=batch_first)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, **self.call)[0]


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attn(x, memory, memory, need_weights=False)[0]


def _same_output(model: nn.Module, transformed: nn.Module, *inputs: torch.Tensor) -> None:
    """Equal outputs in eval() and in train() (the same dropout draws from the same seed)."""
    for train in (False, True):
        model.train(train), transformed.train(train)
        torch.manual_seed(1)
        expected = model(*inputs)
        torch.manual_seed(1)
        torch.testing.assert_close(transformed(*inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_self_attention_becomes_a_fused_qkv_layer_computing_the_same(batch_first, dropout):
    torch.manual_seed(0)
    model = SelfAttention(batch_first, dropout, need_weights=False)
    gm = capture(model)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == ["attn.in_proj", "attn.out_proj"]
    assert gm.meta[KEPT_WHOLE_KEY] == {}
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    sharded = fx_shard.transform(model, plan="auto", mesh_shape={"tp": 4})
    layers = sharded.meta["sharding"].layers
    assert {path: (r.style, r.part_of) for path, r in layers.items()} == {
        **{f"attn.in_proj.{part}": ("colwise", "attn.in_proj") for part in "qkv"},
        "attn.out_proj": ("rowwise", None),
    }
    _same_output(model, sharded, x)


@pytest.mark.parametrize("fused", ["split", "interleave"])
def test_state_dict_keeps_the_packed_keys_in_order_and_loads_back(fused):
    torch.manual_seed(0)
    model = SelfAttention(True, need_weights=False)
    sharded = fx_shard.transform(model, plan="auto", mesh_shape={"tp": 4}, fused=fused)
    theirs, ours = model.state_dict(), sharded.state_dict()
    assert list(ours) == list(theirs) == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    other = SelfAttention(True, need_weights=False)
    sharded.load_state_dict(other.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(sharded.eval()(x), other.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "model, inputs, why",
    [
        (SelfAttention(True), (torch.randn(2, 6, 32),), "need_weights is not False"),
        (SelfAttention(True, need_weights=False, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
         (torch.randn(2, 6, 32),), "a mask other than causal"),
        (CrossAttention(), (torch.randn(2, 6, 32), torch.randn(2, 5, 32)), "not self-attention"),
    ],
    ids=["weights", "padding-mask", "cross-attention"],
)
def test_calls_the_form_does_not_cover_keep_the_layer_whole_and_say_why(model, inputs, why):
    captured = capture_parts(model, inputs, {})
    assert [n.target for n in captured.root.graph.nodes if n.op == "call_module"] == ["attn"]
    assert list(captured.opaque) == ["attn"] and why in captured.opaque["attn"]
    _same_output(model, fx_shard.transform(model, plan="auto", mesh_shape={"tp": 4}), *inputs)


def test_an_unbatched_input_is_refused_by_the_graph_not_computed_wrongly():
    model = SelfAttention(False, need_weights=False)
    gm = capture(model)
    with pytest.raises(AssertionError, match="batched"):
        gm(torch.randn(6, 32))


def test_decoder_with_a_causal_mask_traces_with_only_cross_attention_whole():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
    model = nn.TransformerDecoder(layer, 2)
    tgt, memory = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(6)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = model

        def forward(self, tgt, memory):
            return self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True)

    wrapped = Decoder()
    gm = capture(wrapped)
    assert sorted(gm.meta[KEPT_WHOLE_KEY]) == ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]
    assert "decoder.layers.1.self_attn.in_proj" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    _same_output(wrapped, fx_shard.transform(wrapped, plan="auto", mesh_shape={"tp": 4}), tgt, memory)
