"""LoRA's default target follows the architecture (issue 19: LoRA on Llama with DeepSpeed-Chat's OPT default
crashed the ranks); a name that matches nothing is an error, not a model without adapters."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from dschat_core.training.engine import DEFAULT_LORA_MODULES, apply_lora, lora_targets


@pytest.mark.parametrize(("arch", "blocks"), [("opt", "model.decoder.layers."), ("llama", "model.layers.")])
def test_the_default_targets_each_architectures_blocks(assets, arch, blocks):
    model = AutoModelForCausalLM.from_pretrained(assets[arch])
    targets = lora_targets(model, DEFAULT_LORA_MODULES)
    assert targets and all(name.startswith(blocks) for name in targets)
    adapted = apply_lora(model, 4, DEFAULT_LORA_MODULES, only_optimize_lora=True)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_a_module_name_matching_nothing_is_an_error(assets):
    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    assert lora_targets(model, "no.such.") == []
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(model, 4, "no.such.", only_optimize_lora=True)
