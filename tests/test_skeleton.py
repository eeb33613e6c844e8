"""`models.build_skeleton`: a model of a config's shape for the caller to fill, built without
running HF's weight initialisation (which the server's loop would wait for), with HF's buffers
and tied weights."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from djinn import models


@pytest.fixture
def writes_to_real_weights(monkeypatch):
    """How many times a random fill wrote to a tensor that holds memory (HF's init fills with normal_)."""
    count = {"n": 0}
    real = torch.Tensor.normal_

    def counting(self, *args, **kwargs):
        count["n"] += not self.is_meta
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    return count


def test_a_skeleton_is_built_without_hfs_initialisation(writes_to_real_weights):
    config = models.CATALOGUE[models.TINY_MODEL].config(None)
    models.build_skeleton(config, torch.float32, "cpu")
    assert writes_to_real_weights["n"] == 0
    with torch.device("cpu"):
        AutoModelForCausalLM.from_config(config)
    assert writes_to_real_weights["n"] > 0, "the probe must see HF's own initialisation"


@pytest.mark.parametrize("name", [models.TINY_MODEL, "gpt2"])
def test_a_skeleton_has_the_configs_tensors_hfs_buffers_and_its_ties(name):
    config = models.CATALOGUE[name].config(1)
    skeleton = models.build_skeleton(config, torch.float32, "cpu")
    with torch.device("cpu"):
        reference = AutoModelForCausalLM.from_config(config)
    ours, theirs = skeleton.state_dict(), reference.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert not any(p.is_meta for p in skeleton.parameters()) and not skeleton.training
    for (name_a, a), (name_b, b) in zip(skeleton.named_buffers(), reference.named_buffers()):
        assert name_a == name_b and torch.equal(a, b)
    tied = {id(p) for p in skeleton.parameters()}
    assert len(tied) == len({id(p) for p in reference.parameters()}), "tied weights stay one tensor"


def test_a_meta_skeleton_holds_no_memory():
    skeleton = models.build_skeleton(models.CATALOGUE["gpt2"].config(1), torch.float16, "meta")
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.transformer.wte.weight
