"""Run in a child process by test_gptq_crosscheck.py (GPTQModel is imported only here, never in the test process).

    python tests/gptqmodel_child.py INPUTS.safetensors CASES.json OUTPUT.safetensors

For every case {"name", "bits", "group_size"}: GPTQModel's own GPTQ on ``<name>.weight`` with calibration inputs
``<name>.x`` (``<name>.theirs``: its dequantized weight), and GPTQModel's own unpacking of our packed tensors
(``<name>.qweight`` ... in GPTQ v1, converted to v2 by its converter): ``<name>.unpacked``, the dequantized weight,
and ``<name>.codes``, the integers minus zero points (unpacked with unit scales).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.quantization.config import QuantizeConfig
from gptqmodel.quantization.gptq import GPTQ
from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
from safetensors.torch import load_file, save_file


def their_gptq(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    per_channel = group == -1  # one group: act order is plain desc_act and g_idx stays all zero
    config = QuantizeConfig(
        bits=bits, group_size=group, sym=True, desc_act=per_channel, act_group_aware=not per_channel, damp_percent=0.05
    )
    gptq = GPTQ(linear, config)
    gptq.quantizer.configure(perchannel=True)
    for chunk in inputs.split(512):
        gptq.add_batch(chunk, None)
    return gptq.quantize()[0].detach().float()


def their_unpacking(
    tensors: dict[str, torch.Tensor], name: str, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k, n = tensors[f"{name}.g_idx"].shape[0], tensors[f"{name}.scales"].shape[1]
    module = TorchLinear(
        bits=bits, group_size=group, sym=True, desc_act=False, in_features=k, out_features=n, bias=False
    )
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(module, key).copy_(tensors[f"{name}.{key}"])
    convert_gptq_v1_to_v2_format_module(module, bits, torch.int32)
    module.post_init()
    weight = module.dequantize_weight().float().t()  # [N, K]
    module.scales.fill_(1.0)
    codes = module.dequantize_weight().float().t()
    return weight, codes


def main(inputs: str, cases: str, output: str) -> None:
    tensors = load_file(inputs)
    out = {}
    for case in json.loads(Path(cases).read_text()):
        name, bits, group = case["name"], case["bits"], case["group_size"]
        out[f"{name}.theirs"] = their_gptq(tensors[f"{name}.weight"], tensors[f"{name}.x"], bits, group).contiguous()
        weight, codes = their_unpacking(tensors, name, bits, group)
        out[f"{name}.unpacked"], out[f"{name}.codes"] = weight.contiguous(), codes.contiguous()
    save_file(out, output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
