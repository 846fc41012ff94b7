"""The self-check on the CPU: the error, the first diverging module, nested outputs, modes left as they were.

The sharded side (``shard(check=...)`` on an XLA mesh) is in tests/spmd/test_check.py.
"""

import copy
import math

import pytest
import torch
from torch import nn

import fx_shard
from fx_shard import models
from fx_shard.check import CHECK_KEY, CheckResult, tolerance_for
from fx_shard.models.plans import PLANS


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.act(self.fc1(x))))


class Net(nn.Module):
    """Two blocks and a head; called twice, ``shared`` shows a module's calls told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(self.shared(self.blocks(x))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = (torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),)


def broken(model: nn.Module, path: str) -> nn.Module:
    """A copy of ``model`` whose layer at ``path`` computes something else."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.get_submodule(path).weight[0] += 1
    return copied


def test_a_copy_agrees_exactly():
    model = net()
    result = fx_shard.check(copy.deepcopy(model), model, X)
    assert result == CheckResult(0.0, 1e-5) and result.ok
    assert str(result) == ("self-check: agrees with the original model on the example inputs "
                           "(error 0.0e+00, tolerance 1e-05)")


def test_the_first_diverging_module_is_named_with_the_last_agreeing_one():
    model = net()
    result = fx_shard.check(broken(model, "blocks.1.fc2"), model, X)
    assert not result.ok and result.error > 1e-2
    assert result.first_divergence == "blocks.1.fc2"
    # Call order: a block ends after its layers, so blocks.1.act is the last to agree before blocks.1.fc2.
    assert result.detail.startswith("first diverging module: blocks.1.fc2 (error ")
    assert result.detail.endswith("; the last agreeing module before it: blocks.1.act (error 0.0e+00)")
    assert str(result).splitlines()[1] == result.detail


def test_a_module_called_twice_is_compared_call_by_call():
    # Only the second call's input is wrong: the first call of shared agrees, the second does not.
    class SecondCallWrong(Net):
        def forward(self, x):
            return self.head(self.shared(self.shared(self.blocks(x)) + 1))

    model = net()
    changed = SecondCallWrong()
    changed.load_state_dict(model.state_dict())
    result = fx_shard.check(changed, model, X)
    assert result.first_divergence == "shared"
    assert "first diverging module: shared (call 2) (error " in result.detail
    assert result.detail.endswith("the last agreeing module before it: shared (error 0.0e+00)")


def test_a_difference_outside_every_module_is_said_so():
    class Scaled(Net):
        def forward(self, x):
            return super().forward(x) * 2

    model = net()
    changed = Scaled()
    changed.load_state_dict(model.state_dict())
    result = fx_shard.check(changed, model, X)
    assert not result.ok and result.first_divergence is None
    # blocks.0-1 with their 4 layers each, blocks, shared twice, head: 14 outputs.
    assert result.detail == ("all 14 module outputs compared agree (the last: head); the difference arises in code "
                             "outside any module, between or after them")


def test_a_transformed_model_keeps_the_original_paths_and_its_result():
    model, inputs = models.build("llama"), models.example_inputs("llama")
    gm = fx_shard.transform(model, PLANS["llama"], mesh_shape={"tp": 4}, example_inputs=inputs)
    agrees = fx_shard.check(gm, model, inputs)
    assert agrees.ok and 0 < agrees.error < 1e-6  # attention as einsum: a different order of sums
    assert gm.meta[CHECK_KEY] is agrees
    assert str(agrees) in fx_shard.report(gm)
    with torch.no_grad():
        gm.get_submodule("model.layers.1.mlp.up_proj").weight[3] += 1
    result = fx_shard.check(gm, model, inputs)
    assert result.first_divergence == "model.layers.1.mlp.up_proj"
    assert "the last agreeing module before it: model.layers.1.mlp.gate_proj" in result.detail
    report = fx_shard.report(gm).splitlines()
    assert f"- {str(result).splitlines()[0]}" in report and f"- {result.detail}" in report


def test_layers_kept_fused_with_rows_interleaved_are_not_compared():
    # Their own output is reordered by design: comparing it would blame them for a layer broken later.
    model, inputs = models.build("llama-vllm"), models.example_inputs("llama-vllm")
    gm = fx_shard.transform(model, PLANS["llama-vllm"], mesh_shape={"tp": 4}, example_inputs=inputs, fused="interleave")
    assert gm.meta["sharding"].layers["model.layers.0.mlp.gate_up_proj"].kept_fused
    assert fx_shard.check(gm, model, inputs).ok
    with torch.no_grad():
        gm.get_submodule("model.layers.1.mlp.down_proj").weight[3] += 1
    result = fx_shard.check(gm, model, inputs)
    assert result.first_divergence == "model.layers.1.mlp.down_proj"
    assert "the last agreeing module before it: model.layers.1.self_attn.o_proj" in result.detail


class Nested(nn.Module):
    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.offset = offset

    def forward(self, x):
        y = self.fc(x)
        return {"pair": (y, y.sum(-1)), "last": y[:, -1] + self.offset, "name": "kept"}


def test_nested_outputs_compare_every_tensor_and_name_the_worst():
    torch.manual_seed(0)
    model = Nested()
    changed = Nested(offset=0.5)
    changed.load_state_dict(model.state_dict())
    x = torch.randn(2, 4)
    result = fx_shard.check(changed, model, (x,))
    expected = 0.5 / model(x)["last"].abs().max().item()
    assert math.isclose(result.error, expected, rel_tol=1e-6)
    # The output's own path is named; fc itself agrees, so no module diverges.
    assert result.detail == ("the largest difference is in output['last']; all 1 module outputs compared agree (the last: "
                             "fc); the difference arises in code outside any module, between or after them")


def test_a_hugging_face_model_output_is_compared_by_field():
    import transformers.modeling_outputs as modeling  # the test extra installs transformers: no skip

    class HF(nn.Module):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 4), scale

        def forward(self, x):
            h = self.fc(x)
            return modeling.BaseModelOutput(last_hidden_state=h, hidden_states=(x, h * self.scale))

    torch.manual_seed(0)
    model, changed = HF(), HF(scale=1.5)
    changed.load_state_dict(model.state_dict())
    assert fx_shard.check(copy.deepcopy(model), model, (torch.randn(2, 4),)).error == 0.0
    result = fx_shard.check(changed, model, (torch.randn(2, 4),))
    assert math.isclose(result.error, 0.5, rel_tol=1e-6)  # max |0.5 h| / max |h|
    assert result.detail.startswith("the largest difference is in output['hidden_states'][1]")


def test_outputs_of_another_structure_or_shape_cannot_agree():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Wide(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], -1)

    x = torch.randn(2, 3)
    other = fx_shard.check(Pair(), nn.Identity(), (x,))
    assert other.error == math.inf and not other.ok and other.first_divergence is None
    assert other.detail.startswith("the outputs cannot be compared: the sharded model returns TreeSpec(tuple")
    wide = fx_shard.check(Wide(), nn.Identity(), (x,))
    assert wide.detail == "the outputs cannot be compared: output is (2, 6) in the sharded model, (2, 3) in the original"


class Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x):
        return self.value.expand_as(x)


def test_an_all_zero_reference_takes_the_absolute_difference():
    x = torch.zeros(2, 3)
    assert fx_shard.check(Constant(torch.tensor(0.0)), Constant(torch.tensor(0.0)), (x,)).error == 0.0
    result = fx_shard.check(Constant(torch.tensor(3e-6)), Constant(torch.tensor(0.0)), (x,))
    assert math.isclose(result.error, 3e-6, rel_tol=1e-6) and result.ok
    assert not fx_shard.check(Constant(torch.tensor(1e-3)), Constant(torch.tensor(0.0)), (x,)).ok


def test_nan_agrees_only_with_nan():
    x = torch.zeros(2, 3)
    nan, inf = torch.tensor(math.nan), torch.tensor(math.inf)
    assert fx_shard.check(Constant(nan), Constant(nan), (x,)).error == 0.0
    assert fx_shard.check(Constant(inf), Constant(inf), (x,)).error == 0.0
    result = fx_shard.check(Constant(nan), Constant(torch.tensor(1.0)), (x,))
    assert math.isnan(result.error) and not result.ok


def test_modes_gradients_and_hooks_are_left_as_they_were():
    model = net().train()
    model.blocks[1].eval()
    changed = broken(model, "head")
    changed.blocks[0].eval()
    before = {name: [m.training for m in m_.modules()] for name, m_ in (("model", model), ("changed", changed))}
    result = fx_shard.check(changed, model, X)
    # Both ran in eval(): with dropout (p=0.5) on, the copy's blocks would differ first, not the head.
    assert result.first_divergence == "head"
    assert {name: [m.training for m in m_.modules()] for name, m_ in (("model", model), ("changed", changed))} == before
    for m in (*model.modules(), *changed.modules()):
        assert not m._forward_hooks
    assert all(p.grad is None and p.requires_grad for p in (*model.parameters(), *changed.parameters()))
    assert not hasattr(changed, "meta")  # not fx_shard's model: nothing kept on it


def test_the_default_tolerance_follows_the_least_precise_dtype():
    model = net()
    assert tolerance_for(model) == 1e-5
    assert tolerance_for(model, torch.zeros(2, dtype=torch.float16)) == 1e-2
    assert tolerance_for(model.to(torch.bfloat16)) == 5e-2
    result = fx_shard.check(copy.deepcopy(model), model, (X[0].to(torch.bfloat16),))
    assert result.tolerance == 5e-2 and result.ok
    assert fx_shard.check(copy.deepcopy(model), model, (X[0].to(torch.bfloat16),), tolerance=0.1).tolerance == 0.1


def test_a_model_on_the_meta_device_cannot_be_checked():
    with pytest.raises(fx_shard.FxShardError, match=r"the original model \(Net\) is on the meta device and cannot run: "
                                                    r"check a model with real parameters"):
        fx_shard.check(net(), net().to("meta"), X)


def test_shard_asked_to_check_without_example_inputs_says_what_to_pass():
    # Raised before anything is captured or placed: no mesh needed to see it.
    with pytest.raises(fx_shard.FxShardError, match=r"shard\(\.\.\., check=True\) runs the model on its example inputs, "
                                                    r"and none were given: pass example_inputs="):
        fx_shard.shard(net(), None, check=True)
