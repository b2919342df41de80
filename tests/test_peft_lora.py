"""LoRA training through diffusers' add_adapter (PEFT) on a vqz-quantized transformer."""
import pytest
import torch

import vqz
from vqz.integrations.peft import lora_config
from vqz.nn import QuantLinear

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_add_adapter_trains_a_lora_beside_frozen_quantized_layers(tiny_denoisers):
    build, inputs = tiny_denoisers.FAMILIES["flux"]
    model = vqz.quantize(build(), "w4a8")
    x = inputs(0)
    before = model(**x, return_dict=False)[0]
    model.add_adapter(lora_config(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                                                  target_modules=["to_q", "to_k", "to_v"])))
    wrapped = [m for n, m in model.named_modules() if n.endswith("attn.to_q")]
    assert isinstance(wrapped[0].base_layer, QuantLinear)
    assert torch.equal(model(**x, return_dict=False)[0], before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**x, return_dict=False)[0].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model(**x, return_dict=False)[0]
    assert not torch.equal(after, before) and torch.isfinite(after).all()
    model.disable_adapters()
    assert torch.equal(model(**x, return_dict=False)[0], before)


def test_plain_peft_config_does_not_reach_quantized_layers(tiny_denoisers):
    build, _ = tiny_denoisers.FAMILIES["flux"]
    model = vqz.quantize(build(), "w4a8")
    with pytest.raises((ValueError, TypeError), match="not supported|Target module"):
        model.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q"]))
