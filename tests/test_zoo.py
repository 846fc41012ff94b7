"""The zoo on the CPU: every architecture rewritten with plan="auto" computes the original's function.

In eval() exactly, in train() with the same dropout draws (same seed), and
with the original's checkpoint keys. The same models sharded on XLA meshes:
tests/spmd/test_zoo.py.
"""

import pytest
import torch

import fx_shard
from tests import zoo

CASES = [c.name for c in zoo.CASES]


def test_the_zoo_covers_the_families_the_trust_issue_names():
    assert len(zoo.CASES) >= 30
    assert {c.family for c in zoo.CASES} == {"decoder", "encoder", "encoder-decoder", "vision", "audio", "torch"}


@pytest.mark.parametrize("name", CASES)
def test_rewritten_model_computes_the_original_function(name):
    model, args, kwargs = zoo.case(name).build()
    gm = fx_shard.transform(model, "auto", mesh_shape={"tp": 4}, example_inputs=args, example_kwargs=kwargs)
    assert list(gm.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        for train in (False, True):
            model.train(train), gm.train(train)
            zoo.seed(1)
            expected = zoo.first_tensor(model(*args, **kwargs))
            zoo.seed(1)
            actual = zoo.first_tensor(gm(*args, **kwargs))
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                       msg=lambda m: f"{name} in {'train' if train else 'eval'}(): {m}")
