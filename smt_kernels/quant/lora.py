"""PEFT LoRA on a frozen ``NF4Linear``: the QLoRA baseline without bitsandbytes.

QLoRA's forward: y = base(x) + B(A(dropout(x)))·scaling, where base(x) uses the NF4 (double-quantized) weight
dequantized to the compute dtype. PEFT wraps ``nn.Linear`` and bitsandbytes' ``Linear4bit`` only, so
``NF4LoraLinear`` is registered for ``NF4Linear`` through ``LoraConfig._register_custom_module`` (PEFT's "custom
models" dispatch): ``nf4_lora_config`` and ``get_nf4_peft_model`` on the way in, ``load_nf4_adapter`` to put a
saved adapter back on a freshly quantized base. Merging turns the layer into a plain ``nn.Linear`` in the weight's
dtype before quantization: the dequantized weight plus B·A·scaling, summed in fp32 and rounded once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from smt_kernels.quant.module import NF4Linear

try:
    from peft import LoraConfig
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as err:  # peft is optional; the finetune command reports it as an input error
    raise ImportError("smt_kernels.quant.lora needs PEFT: pip install peft") from err


class NF4LoraLinear(nn.Module, LoraLayer):
    """LoRA adapters on a frozen ``NF4Linear`` (PEFT's ``LoraLayer`` conventions; plain LoRA, no variants).

    The adapters (``lora_A``/``lora_B``) are fp32 parameters on the base's device, whatever its compute dtype:
    they are the run's master weights, as in QLoRA (autocast computes them in bf16 on CUDA).
    """

    def __init__(
        self, base_layer: NF4Linear, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
        # NF4Linear has no .weight for PEFT to read the device from; dtype None keeps the adapters fp32
        return base_layer.weight_packed.device, None

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> None:
        used = [
            name
            for name, on in (
                ("use_dora", config.use_dora),
                ("alora_invocation_tokens", config.alora_invocation_tokens is not None),
                ("arrow_config", getattr(config, "arrow_config", None) is not None),
                ("velora_config", getattr(config, "velora_config", None) is not None),
            )
            if on
        ]
        if used:
            raise ValueError(f"NF4LoraLinear implements plain LoRA only, not {', '.join(used)}")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """B·A·scaling, (out_features, in_features), in the adapters' dtype."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the NF4 base by a plain ``nn.Linear`` in the dtype the weight had before quantization (the
        model's: a bf16 model gets bf16 layers that take its bf16 activations, an fp32 one trained under bf16
        autocast fp32 layers): the dequantized weight plus each adapter's delta, summed in fp32 and rounded once
        (the delta is not rounded on its own). ``unmerge`` puts the original 4-bit layer back (exactly: no
        requantization).
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        w = base.dequantized_weight(torch.float32) if isinstance(base, NF4Linear) else base.weight.data.float()
        for adapter in adapter_names:
            w = w + self.get_delta_weight(adapter).detach().to(w)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs or infs in the merged weight of adapters {adapter_names}; they seem broken")
        if isinstance(base, NF4Linear):
            self._nf4_base = (base,)  # a tuple: not registered as a submodule (no second copy in state_dict)
            bias, dtype = base.bias, base.weight_dtype
            base = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=dtype)
            if bias is not None:
                base.bias.data.copy_(bias)
            base.requires_grad_(False)
            self.base_layer = base
        base.weight.data = w.to(base.weight.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the 4-bit base back (the adapters stay as they are)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.base_layer = self._nf4_base[0]
        del self._nf4_base
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("NF4LoraLinear does not mix adapters in one batch (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            # outside autocast the input goes to the adapters' dtype and the sum back to the base's
            convert = not torch.is_autocast_enabled(x.device.type)
            xa = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
            out = lora_B(lora_A(self.lora_dropout[adapter](xa))) * self.scaling[adapter]
            result = result + (out.to(result.dtype) if convert else out)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def nf4_lora_config(**kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` that puts ``NF4LoraLinear`` on every targeted ``NF4Linear``."""
    config = LoraConfig(**kwargs)
    config._register_custom_module({NF4Linear: NF4LoraLinear})
    return config


def get_nf4_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model`` for a 4-bit model and a config from ``nf4_lora_config``."""
    from peft import get_peft_model

    with _device_hints(model):
        return get_peft_model(model, config, **kwargs)


def load_nf4_adapter(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` for an adapter saved from a 4-bit base, onto ``model`` quantized the same way
    (``quantize_base(model, "nf4")``: deterministic, so the adapter meets the base it was trained on). The custom
    layer is not recorded in adapter_config.json, so it is registered here."""
    from peft import PeftModel

    config = LoraConfig.from_pretrained(str(path))
    config._register_custom_module({NF4Linear: NF4LoraLinear})
    with _device_hints(model):
        return PeftModel.from_pretrained(model, str(path), config=config, **kwargs)


@contextmanager
def _device_hints(model: nn.Module) -> Iterator[None]:
    """While PEFT wraps the layers: each ``NF4Linear`` shows its codes as ``qweight``, where PEFT's
    ``_replace_module`` looks for the device of a weight it cannot find (an NF4Linear without bias has no
    parameter at all: StopIteration). Removed afterwards, so no stale reference survives a later ``.to()``."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear) and "qweight" not in vars(m)]
    for m in layers:
        m.qweight = m.weight_packed
    try:
        yield
    finally:
        for m in layers:
            del m.qweight
