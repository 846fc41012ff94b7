"""FSDP x tensor parallel on fsdp=2 x tp=4: the built-in llama trains as the unsharded model does."""

import pytest
import torch
import torch.nn.functional as F
from conftest import local_shapes, relative_error, sharding_spec

import fx_shard
from fx_shard import models
from fx_shard.models.plans import PLANS
from fx_shard.report import parameter_bytes
from fx_shard.xla import local_shard_bytes


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.devices(8)
def test_llama_trains_on_fsdp_x_tp_as_unsharded(devices):
    import torch_xla

    mesh = fx_shard.make_mesh(fsdp=2, tp=4)
    (tokens,) = models.example_inputs("llama", batch=4)
    model = models.build("llama")
    gm = fx_shard.shard(model, mesh, PLANS["llama"])

    params = {id(p): p for p in gm.parameters()}.values()
    total, per_device, _ = parameter_bytes(gm)
    assert sum(local_shard_bytes(p) for p in params) == per_device  # what XLA holds is what the report says
    assert per_device <= 1.05 * total / 8

    steps, reference = 3, []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(tokens)
        loss = _loss(logits, tokens)
        loss.backward()
        reference.append((logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()

    # Step 0's gradients agree to 7e-7 (rel.); later ones to 3e-5, not 1e-5: AdamW's first update is about
    # lr * sign(grad), so an element whose gradient is rounding noise moves by lr either way (measured).
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    batch = fx_shard.shard_batch(tokens, mesh)
    for step, (logits_0, loss_0, grads_0) in enumerate(reference):
        optimizer.zero_grad()
        logits = gm(batch)
        loss = _loss(logits, batch)
        loss.backward()
        optimizer.step()
        torch_xla.sync()
        if step == 0:
            assert relative_error(logits.detach(), logits_0) <= 1e-5
        assert abs(loss.item() - loss_0) <= 1e-5 * abs(loss_0), step
        grads = {n: p.grad for n, p in gm.named_parameters()}
        assert grads.keys() == grads_0.keys()
        for name, grad in grads.items():
            assert relative_error(grad, grads_0[name]) <= (1e-5 if step == 0 else 1e-4), (step, name)

    states = 0
    for param in params:
        state = optimizer.state[param]
        assert sharding_spec(param) != "", "every llama parameter is sharded on fsdp x tp"
        if param.dim() == 2:
            for key in ("exp_avg", "exp_avg_sq"):
                assert sharding_spec(state[key]) == sharding_spec(param), key
                states += 1
    assert states == 2 * 16  # embedding, lm_head and 7 projections in each of 2 blocks


@pytest.mark.devices(8)
def test_shard_batch_splits_dim_0_over_the_data_axes(devices):
    mesh = fx_shard.make_mesh(dp=2, fsdp=2, tp=2)
    batch = {"tokens": torch.arange(8 * 16).reshape(8, 16), "mask": (torch.ones(8, 4, 2), torch.zeros(8)), "n": 3}
    placed = fx_shard.shard_batch(batch, mesh)
    assert placed["n"] == 3
    assert local_shapes(placed["tokens"]) == {(2, 16)}  # over dp x fsdp: 4 ways; replicated over tp
    assert local_shapes(placed["mask"][0]) == {(2, 4, 2)}
    assert local_shapes(placed["mask"][1]) == {(2,)}
    assert torch.equal(placed["tokens"].cpu(), batch["tokens"])
    with pytest.raises(fx_shard.PlanError, match=r"a batch of shape \(6, 16\) does not split over the data axes "
                       r"dp=2 x fsdp=2 \(4 devices\) on dimension 0; give a batch size that is a multiple of 4"):
        fx_shard.shard_batch(torch.zeros(6, 16), mesh)


@pytest.mark.devices(8)
def test_training_step_collectives_on_fsdp_x_tp(devices):
    mesh = fx_shard.make_mesh(fsdp=2, tp=4)
    gm = fx_shard.shard(models.build("llama"), mesh, PLANS["llama"])
    batch = fx_shard.shard_batch(models.example_inputs("llama", batch=4)[0], mesh)
    counts = fx_shard.collectives(gm, batch, loss=lambda logits: _loss(logits, batch))
    # Forward + backward on fsdp=2 x tp=4 (devices fsdp * 4 + tp), by the groups in XLA's partitioned HLO:
    # - all-reduce 54: 21 over fsdp, one per parameter's gradient (16 weights, 5 norms; all-reduced whole,
    #   then sliced: XLA's CPU pipeline forms no reduce-scatter) + 3 scalars of the loss; 18 over tp (the
    #   vocab-parallel embedding, o_proj and down_proj forward and their input gradients backward, and the
    #   loss over vocab-sharded logits); 8 over the tp devices sharing a KV head and 4 across KV groups (k/v
    #   on "tp:2" x fsdp: XLA splits their contraction instead of gathering the weight).
    # - all-gather 32: 28 over fsdp (11 weights, q/o/gate/up/down per block and lm_head, gathered in the
    #   forward and again in the backward; the 5 norm weights; the token ids, for the embedding lookup) and
    #   4 of k/v activations over the devices sharing a KV head.
    # - collective-permute 8 (the k/v weights, forward and backward), all-to-all 5 (activations between
    #   batch-sharded and fsdp-sharded layouts: 3 in the forward, after the embedding and each o_proj; 2 in
    #   the backward).
    # The forward alone: all-reduce 9, all-gather 17, all-to-all 3, collective-permute 4 (tp=8: 5 all-reduces).
    assert dict(counts.nonzero()) == {"all-reduce": 54, "all-gather": 32, "all-to-all": 5, "collective-permute": 8}


@pytest.mark.devices(8)
def test_shard_model_refuses_an_fsdp_mesh(devices):
    model = models.build("llama-vllm")
    with pytest.raises(fx_shard.PlanError, match=r"shard_model shards over the tensor-parallel axis only, as vLLM's "
                       r"does, but mesh \{'fsdp': 2, 'tp': 4\} has an 'fsdp' axis; use fx_shard.shard"):
        fx_shard.shard_model(model, fx_shard.make_mesh(fsdp=2))


@pytest.mark.devices(8)
def test_load_sharded_fills_the_fsdp_layout(devices):
    from fx_shard.checkpoint import load_sharded

    mesh = fx_shard.make_mesh(fsdp=2, tp=4)
    model = models.build("llama")
    gm = fx_shard.shard(models.build("llama", seed=1), mesh, PLANS["llama"])
    specs = {name: sharding_spec(p) for name, p in gm.named_parameters()}
    load_sharded(gm, model.state_dict(), mesh)
    assert {name: sharding_spec(p) for name, p in gm.named_parameters()} == specs
    assert local_shapes(gm.model.norm.weight) == {(32,)}  # a parameter of no layer, over fsdp
    assert local_shapes(gm.get_parameter("model.layers.0.mlp.down_proj.weight")) == {(32, 32)}  # (fsdp, tp)
    (tokens,) = models.example_inputs("llama", batch=4)
    with torch.no_grad():
        assert relative_error(gm(fx_shard.shard_batch(tokens, mesh)), model(tokens)) <= 1e-5
