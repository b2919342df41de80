"""Training LoRA adapters through PEFT (diffusers' `model.add_adapter`) on vqz-quantized layers.

PEFT wraps only the layer types it knows; `lora_config(config)` registers vqz's QuantLinear with a
peft LoraConfig, so that

    model.add_adapter(vqz.integrations.peft.lora_config(LoraConfig(r=16, target_modules=[...])))

puts a trainable 16-bit LoRA beside each quantized layer (the 4-bit weights stay frozen), as PEFT
does for its own quantized backends.
"""
from __future__ import annotations

import functools

from torch import nn

from ..nn.linear import QuantLinear


def lora_config(config):
    """`config` (a peft LoraConfig) with QuantLinear registered as a LoRA target; returns it."""
    config._register_custom_module({QuantLinear: _lora_layer_class()})
    return config


@functools.cache
def _lora_layer_class():
    """Built on first use, so that importing vqz never imports peft."""
    from peft.tuners.lora.layer import LoraLayer

    class QuantLinearLora(nn.Module, LoraLayer):
        """y = base(x) + Σ scaling · B(A(dropout(x))) over the active adapters; base: a QuantLinear."""

        def __init__(self, base_layer: QuantLinear, adapter_name: str, config, r: int = 0,
                     lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer):
            # PEFT reads `.weight`/`.qweight` as tensors; a QuantLinear's qweight is a module
            tensor = next(iter(base_layer.buffers()), None) if base_layer.bias is None else base_layer.bias
            return (None, None) if tensor is None else (tensor.device, None)

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                down, up = self.lora_A[name], self.lora_B[name]
                delta = up(down(self.lora_dropout[name](x.to(down.weight.dtype))))
                result = result + (delta * self.scaling[name]).to(result.dtype)
            return result

    return QuantLinearLora
