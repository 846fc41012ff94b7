"""torch.compile on the XLA mesh: ``shard`` then openxla, and ``fx_shard.backend``.

Each compiled model gives the unsharded model's outputs, compiles once
(``STEPS`` more calls on new inputs of the same shapes compile nothing:
torch_xla's ``CompileTime`` / ``UncachedCompile`` and dynamo's graph counts
stay put), and, through ``fx_shard.backend``, has the collectives of the
eager ``shard`` path.

Collectives of a compiled model are counted from the programs XLA dumps
during its first call (``fx_shard.collectives`` runs the model and reads the
pending graph, but a compiled model leaves nothing pending). XLA dumps a
program only the first time it compiles it in a process, so the backend
tests run on a batch size no other test uses.
"""

import copy

import pytest
import torch
from conftest import relative_error

import fx_shard
from fx_shard import models
from fx_shard.collectives import collectives
from fx_shard.hlo import collectives_in, dump_snapshot, partitioned_modules
from fx_shard.models.plans import PLANS
from fx_shard.sharding import SHARDING_KEY, layer_parameters
from fx_shard.xla import hlo_dump_dir
from tests.hf_models import build_hf, hf_inputs

STEPS = 5
ZERO = {"all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}
BACKEND_BATCH = 3  # programs compiled by no other test, so XLA dumps them


def on_device(value):
    return value.to(fx_shard.xla_device()) if torch.is_tensor(value) else value


def compilations() -> dict[str, int]:
    """What counts compilations: XLA programs (all, and graph-cache misses) and dynamo graphs."""
    import torch._dynamo.utils
    import torch_xla.debug.metrics as met

    return {
        "xla programs": (met.metric_data("CompileTime") or [0])[0],
        "xla cache misses": met.counter_value("UncachedCompile") or 0,
        "dynamo graphs to xla": met.counter_value("DynamoExtractCompiledGraph") or 0,
        "dynamo graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


def first_call(compiled, *args, **kwargs):
    """Call ``compiled`` the first time; its output and the collectives of the programs that compiled."""
    dump = hlo_dump_dir()
    before = dump_snapshot(dump)
    with torch.no_grad():
        output = compiled(*map(on_device, args), **{k: on_device(v) for k, v in kwargs.items()})
    files = partitioned_modules(dump, before)
    assert files, "XLA dumped no program: it compiled this one earlier in the process (use other shapes)"
    return output, {op: s.count for op, s in collectives_in(files).items()}


def steps_compile_nothing(compiled, reference, inputs: list, logits=lambda out: out) -> None:
    """``compiled`` on each of ``inputs`` (args tuple or kwargs dict) compiles nothing and matches ``reference``."""
    before = compilations()
    outputs = []
    with torch.no_grad():
        for x in inputs:
            if isinstance(x, dict):
                outputs.append(logits(compiled(**{k: on_device(v) for k, v in x.items()})))
            else:
                outputs.append(logits(compiled(*map(on_device, x))))
    # Read before copying to the host: torch_xla compiles a ReplicateShardedData program for every
    # .cpu() of a sharded tensor (also eagerly), which is not the model recompiling.
    assert compilations() == before
    with torch.no_grad():
        for x, out in zip(inputs, outputs):
            expected = logits(reference(**x) if isinstance(x, dict) else reference(*x))
            assert relative_error(out, expected) <= 1e-5


def step_inputs(name: str, batch: int = 2) -> list[tuple]:
    return [models.example_inputs(name, batch=batch, seed=seed) for seed in range(1, STEPS + 1)]


def records(gm) -> dict:
    return {n.target: (r.style, dict(r.specs)) for n in gm.graph.find_nodes(op="call_module") if (r := n.meta.get(SHARDING_KEY))}


@pytest.mark.parametrize("name", models.MODELS)
def test_shard_then_openxla(name, mesh):
    model, inputs = models.build(name), models.example_inputs(name)
    compiled = torch.compile(fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs), backend="openxla")
    with torch.no_grad():
        assert relative_error(compiled(*map(on_device, inputs)), model(*inputs)) <= 1e-5
    steps_compile_nothing(compiled, model, step_inputs(name))


@pytest.mark.parametrize("name", models.MODELS)
def test_shard_then_openxla_keeps_the_eager_collectives(name, mesh):
    # aot_autograd would decompose torch.einsum into bmm over merged batch*heads (all-gathers of q, k, v);
    # fx_shard.ops computes its einsums through the fx_shard::einsum custom op, which it keeps whole.
    model, inputs = models.build(name), models.example_inputs(name, batch=4)  # batch 1 would hide it
    gm = fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs)
    _, counts = first_call(torch.compile(gm, backend="openxla"), *inputs)
    assert counts == {"all-reduce": 4 if name == "vit" else 5, **ZERO}


def test_hugging_face_llama_shard_then_openxla(mesh):
    model, kwargs = build_hf("llama"), hf_inputs()
    compiled = torch.compile(fx_shard.shard(model, mesh, "auto", example_kwargs=kwargs), backend="openxla")
    with torch.no_grad():
        output = compiled(**{k: on_device(v) for k, v in kwargs.items()})
        assert relative_error(output.logits, model(**kwargs).logits) <= 1e-5
    steps = [hf_inputs() | {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s))}
             for s in range(1, STEPS + 1)]
    steps_compile_nothing(compiled, model, steps, logits=lambda out: out.logits)


@pytest.mark.parametrize("name", models.MODELS)
def test_backend_shards_as_shard_does(name, mesh):
    model = models.build(name)
    inputs = models.example_inputs(name, batch=BACKEND_BATCH)
    gm = fx_shard.shard(model, mesh, PLANS[name], example_inputs=inputs)
    eager = dict(collectives(gm, *inputs))
    shard_backend = fx_shard.backend(mesh, PLANS[name])
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=shard_backend)
    output, counts = first_call(compiled, *inputs)
    assert counts == eager == {"all-reduce": 4 if name == "vit" else 5, **ZERO}
    with torch.no_grad():
        assert relative_error(output, model(*inputs)) <= 1e-5
    (captured,) = shard_backend.graphs
    assert records(captured) == records(gm)
    steps_compile_nothing(compiled, model, step_inputs(name, BACKEND_BATCH))


def test_backend_on_hugging_face_llama(mesh, devices):
    model = build_hf("llama")
    kwargs = hf_inputs(batch=BACKEND_BATCH)
    root = fx_shard.shard(model, mesh, "auto", example_kwargs=kwargs)
    eager = dict(collectives(root, **kwargs))
    shard_backend = fx_shard.backend(mesh, "auto")
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=shard_backend)
    output, counts = first_call(compiled, **kwargs)
    assert counts == eager == {"all-reduce": 5, **ZERO}
    with torch.no_grad():
        assert relative_error(output.logits, model(**kwargs).logits) <= 1e-5
    (captured,) = shard_backend.graphs
    expected = {path: (r.style, dict(r.specs)) for path, r, pname, _ in layer_parameters(root) if pname == "weight"}
    assert records(captured) == expected
    # 2 KV heads: k/v over all devices on 2, over the blocks "tp:2" on 4 and 8, as shard does.
    kv = [n.meta[SHARDING_KEY] for n in captured.graph.find_nodes(op="call_module") if n.target.endswith(("k_proj", "v_proj"))]
    assert {r.specs["weight"] for r in kv} == {("tp" if devices == 2 else "tp:2", None)}
    steps = [hf_inputs(batch=BACKEND_BATCH) | {"input_ids": torch.randint(0, 256, (BACKEND_BATCH, 16),
                                                                          generator=torch.Generator().manual_seed(s))}
             for s in range(1, STEPS + 1)]
    steps_compile_nothing(compiled, model, steps, logits=lambda out: out.logits)


def test_backend_gathers_logits_when_asked(mesh):
    import torch_xla

    model, inputs = models.build("llama"), models.example_inputs("llama", batch=6)
    plan = {**PLANS["llama"], "lm_head": {"style": "lm_head", "gather_output": True}}
    eager = dict(collectives(fx_shard.shard(model, mesh, plan, example_inputs=inputs), *inputs))
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=fx_shard.backend(mesh, plan))
    output, counts = first_call(compiled, *inputs)
    assert counts == eager == {"all-reduce": 5, **ZERO, "all-gather": 1}
    assert torch_xla._XLAC._get_xla_sharding_spec(output) == "{replicated}"
    with torch.no_grad():
        assert relative_error(output, model(*inputs)) <= 1e-5


def test_backend_on_a_kv_mesh(devices):
    mesh = fx_shard.make_mesh(kv=2)
    model, inputs = models.build("llama-vllm"), models.example_inputs("llama-vllm", batch=5)
    eager = dict(collectives(fx_shard.shard(model, mesh, PLANS["llama-vllm"], example_inputs=inputs), *inputs))
    shard_backend = fx_shard.backend(mesh, PLANS["llama-vllm"])
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=shard_backend)
    output, counts = first_call(compiled, *inputs)
    assert counts == eager == {"all-reduce": 5, **ZERO}
    with torch.no_grad():
        assert relative_error(output, model(*inputs)) <= 1e-5
    k = next(n.meta[SHARDING_KEY] for n in shard_backend.graphs[0].graph.find_nodes(op="call_module") if n.target.endswith("qkv_proj.k"))
    assert k.specs["weight"] == (("kv", None) if devices > 2 else (("kv", "tp"), None))


def test_backend_recompiles_for_new_shapes_reusing_the_split_parts(mesh):
    model = models.build("llama-vllm")
    shard_backend = fx_shard.backend(mesh, PLANS["llama-vllm"])
    compiled = torch.compile(copy.deepcopy(model).to(fx_shard.xla_device()), backend=shard_backend, dynamic=False)
    for seq_len in (16, 8):
        inputs = models.example_inputs("llama-vllm", batch=7, seq_len=seq_len)
        with torch.no_grad():
            assert relative_error(compiled(*map(on_device, inputs)), model(*inputs)) <= 1e-5
    first, second = shard_backend.graphs
    assert [id(p) for p in first.parameters()] == [id(p) for p in second.parameters()]


def test_shard_then_openxla_gathers_logits_when_asked(mesh):
    import torch_xla

    model, inputs = models.build("llama"), models.example_inputs("llama", batch=7)
    plan = {**PLANS["llama"], "lm_head": {"style": "lm_head", "gather_output": True}}
    compiled = torch.compile(fx_shard.shard(model, mesh, plan, example_inputs=inputs), backend="openxla")
    output, counts = first_call(compiled, *inputs)
    assert counts == {"all-reduce": 5, **ZERO, "all-gather": 1}
    assert torch_xla._XLAC._get_xla_sharding_spec(output) == "{replicated}"
    with torch.no_grad():
        assert relative_error(output, model(*inputs)) <= 1e-5
