"""The zoo sharded on XLA meshes with plan="auto": the unsharded model's output, through shard() and the backend.

Each path runs in one child (the suite's time budget): ``shard`` on 8
devices, where 4 KV heads need the KV sub-axis; the ``torch.compile``
backend on 2. tests/test_zoo.py checks every case's rewrite on the CPU.
"""

import copy
import re
from pathlib import Path

import pytest
import torch

import fx_shard
from tests import zoo
from tests.spmd.conftest import relative_error

CASES = [c.name for c in zoo.CASES]
ROOT = Path(__file__).resolve().parents[2]


def _on(device, values):
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


# The cases at the Megatron optimum on 8 devices (Case.optimum all-reduces, no other collective): docs/zoo.md
# lists what the others pay, the work of the architectures issue.
AT_OPTIMUM = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "olmo", "opt", "starcoder2", "stablelm",
              "distilbert", "bart", "whisper", "timm-vit", "timm-beit", "timm-swin", "torchvision-vit", "nn-encoder",
              "nn-encoder-prenorm"}


@pytest.mark.devices(8)
@pytest.mark.parametrize("name", CASES)
def test_shard_gives_the_unsharded_output(name, mesh):
    model, args, kwargs = zoo.case(name).build()
    with torch.no_grad():
        expected = zoo.first_tensor(model(*args, **kwargs))
        gm = fx_shard.shard(model, mesh, "auto", example_inputs=args, example_kwargs=kwargs)
        device = fx_shard.xla_device()
        actual = zoo.first_tensor(gm(*_on(device, args), **dict(zip(kwargs, _on(device, kwargs.values())))))
    assert relative_error(actual, expected) <= 1e-5
    if name in AT_OPTIMUM:  # the same program: its dump is found, nothing compiles again
        assert dict(fx_shard.collectives(gm, *args, **kwargs).nonzero()) == {"all-reduce": zoo.case(name).optimum}


@pytest.mark.devices(2)
@pytest.mark.parametrize("name", CASES)
def test_backend_gives_the_unsharded_output(name, mesh):
    case = zoo.case(name)
    model, args, kwargs = case.build()
    with torch.no_grad():
        expected = zoo.first_tensor(model(*args, **kwargs))
        device = fx_shard.xla_device()
        args, kwargs = _on(device, args), dict(zip(kwargs, _on(device, kwargs.values())))
        torch._dynamo.reset()
        if case.openxla_fails:  # fx_shard's backend fails where openxla alone does, and adds no failure of its own
            errors = []
            for backend in ("openxla", fx_shard.backend(mesh, plan="auto")):
                with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=case.openxla_fails) as error:
                    torch.compile(copy.deepcopy(model).to(device), backend=backend)(*args, **kwargs)
                errors.append(str(error.value.inner_exception))
                torch._dynamo.reset()
            assert errors[0] == errors[1]
            return
        compiled = torch.compile(model.to(device), backend=fx_shard.backend(mesh, plan="auto"))
        actual = zoo.first_tensor(compiled(*args, **kwargs))
    assert relative_error(actual, expected) <= 1e-5


def _doc_rows() -> dict[str, dict[str, str]]:
    """docs/zoo.md's table, by model."""
    lines = [line for line in (ROOT / "docs" / "zoo.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["model"]: row for row in rows}


@pytest.mark.devices(4)
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_docs_zoo_is_what_benchmarks_zoo_measures(name, mesh):
    """docs/zoo.md is made at 4 devices by benchmarks/zoo.py: a fresh measurement of a few rows must match it."""
    from benchmarks import zoo as bench

    fresh, doc = bench.measure(zoo.case(name), mesh), _doc_rows()[name]
    for column in ("shard()", "backend", "all-reduce", "other collectives", "shardable bytes split", "capture"):
        # The error's digits vary with float rounding; exact or not, and everything else, must not.
        same = re.sub(r"\(\de-\d+\)", "", fresh[column]) == re.sub(r"\(\de-\d+\)", "", doc[column])
        assert same, f"docs/zoo.md is stale ({name}, {column}: {doc[column]!r}, now {fresh[column]!r}); regenerate: python benchmarks/zoo.py"
