"""Capture: the tracer's parameter look-up and the meta-device shape propagation match torch.fx's own."""

import pytest
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fx_shard import models
from fx_shard.capture import LinearLeafTracer, capture, propagate_shapes


def _layout(meta):
    """``tensor_meta`` as comparable data: shape, dtype, strides, requires_grad (nested for tuples)."""
    if hasattr(meta, "_fields") and "shape" in meta._fields:
        return (tuple(meta.shape), meta.dtype, tuple(meta.stride), meta.requires_grad)
    if isinstance(meta, (list, tuple)):
        return [_layout(m) for m in meta]
    return meta


@pytest.mark.parametrize("name", ["llama", "llama-vllm", "gpt2", "vit"])
def test_meta_shapes_equal_shape_prop(name):
    """Remembered op layouts and attention's shape rule give what running every meta kernel gives."""
    overrides = {"num_hidden_layers": 3} if name.startswith("llama") else {}
    model = models.build(name, device="meta", **overrides)
    inputs = tuple(t.to("meta") for t in models.example_inputs(name))
    reference, fast = capture(model), capture(model)
    ShapeProp(reference).propagate(*inputs)
    propagate_shapes(fast, inputs)
    pairs = list(zip(reference.graph.nodes, fast.graph.nodes, strict=True))
    described = [(_layout(a.meta.get("tensor_meta")), _layout(b.meta.get("tensor_meta"))) for a, b in pairs]
    assert [a for a, _ in described] == [b for _, b in described]
    assert sum(a is not None for a, _ in described) > 50


def test_tracer_finds_parameters_read_in_forward_by_identity():
    """A norm's weight read in forward is one get_attr under its first name, as fx.Tracer names it."""
    model = models.build("llama", num_hidden_layers=2)
    ours = LinearLeafTracer().trace(model)
    theirs = fx.Tracer().trace(model)
    get_attrs = lambda g: [n.target for n in g.nodes if n.op == "get_attr"]  # noqa: E731
    assert get_attrs(ours) == get_attrs(theirs)
    assert "model.layers.1.input_layernorm.weight" in get_attrs(ours)


def test_meta_shapes_keep_tied_and_tuple_outputs():
    """Ops returning several tensors (split) come back as several tensors of the remembered layouts."""

    class Splits(torch.nn.Module):
        def forward(self, x):
            a, b = x.split([3, 5], dim=-1)
            c, d = x.split([3, 5], dim=-1)
            return a * c, b + d

    gm = capture(Splits())
    propagate_shapes(gm, (torch.randn(2, 8, device="meta"),))
    shapes = {n.name: _layout(n.meta["tensor_meta"]) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["split"] == shapes["split_1"] == [((2, 3), torch.float32, (8, 1), False), ((2, 5), torch.float32, (8, 1), False)]
    assert shapes["mul"][0] == (2, 3) and shapes["add"][0] == (2, 5)


def _close(actual, expected):
    """Outputs of a model (a tensor, a tuple, or a Hugging Face output) agree to float32 rounding."""
    pick = lambda out: getattr(out, "last_hidden_state", out[0] if isinstance(out, tuple) else out)  # noqa: E731
    torch.testing.assert_close(pick(actual), pick(expected), rtol=1e-5, atol=1e-5)


def test_torch_nn_modules_stay_whole_where_parents_read_their_attributes():
    """nn.TransformerEncoder reads its layers' norm eps and attention flags: they must stay what they are."""
    import fx_shard

    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    x = torch.randn(2, 5, 32)
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    _close(gm(x), model(x))
    assert type(gm.layers[0]) is torch.nn.TransformerEncoderLayer
    assert gm.meta["sharding"].opaque["layers.0"] == "a torch.nn module: kept whole, as its parent reads its attributes"


def test_modules_without_linear_layers_are_not_replaced():
    """Whisper's encoder reads conv1.stride; a Conv1d has nothing to shard, so it is never traced as a part."""
    import transformers as t

    import fx_shard

    config = t.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                             max_source_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             decoder_start_token_id=1)
    torch.manual_seed(0)
    encoder = t.WhisperModel(config).get_encoder().eval()
    x = torch.randn(2, 8, 32)
    gm = fx_shard.transform(encoder, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    _close(gm(x), encoder(x))
    assert type(gm.conv1) is torch.nn.Conv1d


def test_parts_are_traced_with_the_arguments_their_parent_passes():
    """BERT's embeddings get token_type_ids=None from the parent: traced so, and asserted at each call."""
    import transformers as t

    import fx_shard

    torch.manual_seed(0)
    model = t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(ids,))
    _close(gm(ids), model(ids))  # BertEmbeddings got token_type_ids=None (it failed on first call before)
    opaque = gm.meta["sharding"].opaque
    assert opaque["encoder.layer.0.attention.self"] == (
        "its argument 'kwargs' is a variable argument list (variadic keyword), which a torch.fx graph cannot take")
    assert isinstance(gm.encoder.layer[0].intermediate, fx.GraphModule)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, bias=None, mask=None, scale=1.0):
        y = self.fc(x) if mask is None else self.fc(x) * mask
        return (y if bias is None else y + bias) * scale


class _Branching(torch.nn.Module):
    """Calls its block as ``call(block, x)`` says, then branches on a value: torch.fx traces it part by part."""

    def __init__(self, call):
        super().__init__()
        self.block, self.call = _Block(), call

    def forward(self, x):
        y = self.call(self.block, x)
        return -y if x.sum() > 0 else y


def test_non_tensor_arguments_are_specialized_and_asserted():
    import fx_shard

    model, x = _Branching(lambda block, x: block(x, None, None, 2.0)), torch.ones(2, 8)
    gm = fx_shard.transform(model, {"block.fc": "colwise"}, mesh_shape={"tp": 2}, example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x))
    assert "bias has been specialized to have value None" in gm.block.code
    with pytest.raises(AssertionError, match="scale has been specialized to have value 2.0"):
        gm.block(x, None, None, 3.0)


def test_specialized_arguments_keep_their_names_for_callers_passing_them_by_keyword():
    """RoBERTa's parent passes position_ids=None by name; torch.fx would name the argument position_ids_1."""
    import inspect

    import fx_shard

    # bias left to its default, mask a tensor after it, both by keyword
    model, x = _Branching(lambda block, x: block(x, mask=x, scale=2.0)), torch.ones(2, 8)
    gm = fx_shard.transform(model, {"block.fc": "colwise"}, mesh_shape={"tp": 2}, example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x))
    assert list(inspect.signature(gm.block.forward).parameters) == ["x", "bias", "mask", "scale"]


def test_tensor_attributes_do_not_become_checkpoint_keys():
    """A tensor kept as a plain attribute becomes a graph constant: non-persistent, as it was not in the state_dict."""
    import fx_shard

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.scale = torch.arange(8.0)
            self.register_buffer("shift", torch.ones(8), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.scale + self.shift

    model = Scaled()
    gm = fx_shard.transform(model, {"fc": "colwise"}, mesh_shape={"tp": 2})
    assert list(gm.state_dict()) == list(model.state_dict()) == ["fc.weight", "fc.bias"]
    gm.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), model(x))


class _Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.dropout(self.fc1(x), 0.5, training=self.training))


@pytest.mark.parametrize("mode_at_transform", ["train", "eval"])
def test_the_result_follows_train_and_eval_like_the_model(mode_at_transform):
    import fx_shard

    torch.manual_seed(0)
    model = _Dropped().train(mode_at_transform == "train")
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(torch.randn(2, 8),))
    x = torch.randn(4, 8)
    for mode in (True, False, True):
        gm.train(mode), model.train(mode)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(gm(x), expected)
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout fires in train()
    assert "self.training" in gm.meta["sharding"].opaque[""]


def test_a_forward_reading_training_that_computes_the_same_in_both_modes_is_traced():
    """timm's attention reads self.training for its dropout rate; with the rate 0 both modes trace alike."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=4)
    gm = capture(model.eval())
    assert gm.graph.find_nodes(op="call_function", target=torch.nn.functional.scaled_dot_product_attention)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))


def test_the_same_computation_with_tensor_constants_is_traced_in_either_mode():
    """timm BEiT indexes its relative position table with a tensor constant: each trace names it anew."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=1,
                              num_heads=8, num_classes=4)
    gm = capture(model.eval())  # it read self.training; the second trace's constant was _tensor_constant1
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm.train()(x), model.train()(x))  # its dropout rates are 0


class _JoinedBias(torch.nn.Module):
    """timm BEiT's qkv: the layer's weight through F.linear with a bias joined from separate q and v biases."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(16, 16)
        self.q_bias, self.v_bias = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = torch.nn.functional.linear(x, weight=self.qkv.weight, bias=bias).chunk(3, dim=-1)
        return self.proj(q * k + v)


def test_a_layer_called_through_its_weight_becomes_a_module_call_and_is_planned():
    import fx_shard

    model, x = _JoinedBias(), torch.randn(2, 4, 16)
    gm = capture(model)
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["qkv", "proj"]
    assert not gm.graph.find_nodes(op="call_function", target=torch.nn.functional.linear)
    torch.testing.assert_close(gm(x), model(x))
    planned = fx_shard.transform(model, "auto", mesh_shape={"tp": 2}, example_inputs=(x,))
    layers = planned.meta["sharding"].layers  # a fused qkv through the bias add: split, each part adds its bias
    assert [layers[f"qkv.{p}"].specs["weight"] for p in "qkv"] == [("tp", None)] * 3
    assert not planned.graph.find_nodes(op="call_function", target=torch.cat)
    torch.testing.assert_close(planned(x), model(x))
