"""Pure quantization math: group sizes, scales, round-to-nearest, dequantization, GPTQ int32 packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from owl3.quantize.qmath import (
    QuantizedWeight,
    activation_scale,
    contiguous_g_idx,
    dequantize,
    fake_quantize_int8,
    group_size_for,
    pack_cols,
    pack_factor,
    pack_rows,
    rtn_quantize,
    symmetric_scale,
    unpack_cols,
    unpack_rows,
)


@pytest.mark.parametrize(
    ("k", "preferred", "expected"),
    [(128, 128, 128), (3584, 128, 128), (352, 128, 32), (96, 128, 32), (48, 128, 16), (100, 128, None),
     (352, -1, 352), (256, 64, 64), (4304, 128, 16)],
)  # fmt: skip
def test_group_size_adapts_to_k(k: int, preferred: int, expected: int | None) -> None:
    assert group_size_for(k, preferred) == expected


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_rows_round_trip_every_code(bits: int) -> None:
    pf = pack_factor(bits)
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (pf * 16, 40), generator=generator)
    codes[:pf, 0] = 2**bits - 1  # a word whose top bit is set: negative as int32
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (16, 40)
    assert int(packed[0, 0]) == -1
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_cols_round_trip(bits: int) -> None:
    values = torch.randint(0, 2**bits, (3, pack_factor(bits) * 5), generator=torch.Generator().manual_seed(1))
    packed = pack_cols(values, bits)
    assert packed.shape == (3, 5) and packed.is_contiguous()
    assert torch.equal(unpack_cols(packed, bits), values.to(torch.int32))


def test_packing_layout_is_gptq_v1() -> None:
    """Word r holds q[r*pf + j] at bit offset bits*j; a symmetric 4-bit zero stored as zero - 1 is 0x77777777."""
    codes = torch.arange(8)[:, None].repeat(1, 2)  # rows 0..7
    assert int(pack_rows(codes, 4)[0, 0]) == 0x76543210
    assert int(pack_cols(torch.full((1, 8), 8 - 1), 4)[0, 0]) == 0x77777777
    assert int(pack_cols(torch.full((1, 4), 128 - 1), 8)[0, 0]) == 0x7F7F7F7F
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows(torch.zeros(6, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="3-bit packing is not supported"):
        pack_factor(3)


def test_symmetric_scales_are_fp16_and_gptqmodel_shaped() -> None:
    absmax = torch.tensor([0.0, 1.0, 7.5, 1e-9])
    scale = symmetric_scale(absmax, 4)
    assert torch.equal(scale, scale.to(torch.float16).to(torch.float32))  # exactly an fp16 value
    assert scale[0] == symmetric_scale(torch.tensor([1.0]), 4)[0]  # an all-zero group: max |w| taken as 1
    assert scale[1] == pytest.approx(2 / 15, rel=1e-3)  # 2 * max / (2^bits - 1)
    assert scale[3] == torch.finfo(torch.float16).tiny  # floored, never 0
    with pytest.raises(ValueError, match="fp16 scale range"):
        symmetric_scale(torch.tensor([1e6]), 4)


@pytest.mark.parametrize(("bits", "group"), [(4, 128), (4, 32), (8, 256)])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits: int, group: int) -> None:
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    quantized = rtn_quantize(weight, bits, group)
    assert quantized.codes.shape == (256, 24) and quantized.scales.shape == (256 // group, 24)
    assert quantized.has_trivial_g_idx()
    step = quantized.scales.to(torch.float32)[quantized.g_idx.long()].t()  # [N, K]
    error = (quantized.dequantize() - weight).abs()
    # Half a step, except at +max|w|: 2^(bits-1) - 0.5 steps round up and clamp one lower (GPTQModel's symmetric
    # grid), a little more than half a step when the fp16 scale rounded down (relative error <= 2^-11).
    assert bool((error <= (0.5 + 2 ** (bits - 1) * 2**-10) * step).all())
    assert float((error / step).max()) > 0.49
    assert int(quantized.codes.min()) >= 0 and int(quantized.codes.max()) <= 2**bits - 1


def test_dequantize_follows_g_idx_and_zeros() -> None:
    codes = torch.tensor([[3, 9], [0, 15], [8, 8], [1, 2]], dtype=torch.int32)  # [K=4, N=2]
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.25]], dtype=torch.float16)
    zeros = torch.tensor([[8, 8], [7, 9]], dtype=torch.int32)
    g_idx = torch.tensor([1, 0, 0, 1], dtype=torch.int32)  # an act-order style (non-contiguous) g_idx
    expected = torch.tensor([[2.0 * (3 - 7), 0.25 * (9 - 9)], [0.5 * -8, 1.0 * 7], [0.0, 0.0], [2.0 * -6, 0.25 * -7]])
    assert torch.equal(dequantize(codes, scales, zeros, g_idx), expected)
    weight = QuantizedWeight(codes, scales, zeros, g_idx, 4, 2)
    assert not weight.has_trivial_g_idx()
    assert torch.equal(contiguous_g_idx(4, 2), torch.tensor([0, 0, 1, 1], dtype=torch.int32))


def test_int8_activation_fake_quant_saturates_and_rounds_half_even() -> None:
    scale = torch.tensor([activation_scale(127.0)])
    assert float(scale) == pytest.approx(1.0)
    x = torch.tensor([0.5, 1.5, -2.5, 300.0, -300.0])
    assert torch.equal(fake_quantize_int8(x, scale), torch.tensor([0.0, 2.0, -2.0, 127.0, -128.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_int8_activations_equal_onnx_runtimes_quantize_dequantize(dtype) -> None:
    """The PyTorch quantized model and the exported W8A8 graphs quantize activations identically: scale rounded
    to the input's dtype, division and round-half-to-even in float32, saturation to [-128, 127]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from owl3.quantize.qmath import fake_quantize_int8

    scale = torch.tensor([0.0123], dtype=torch.float32)
    ort_type = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    np_type = np.float32 if dtype == torch.float32 else np.float16
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.6, 4000), np.arange(-130, 130) * float(scale) * 1.5, [2.0, -2.0, 0.0]])
    x = x.astype(np_type)[None]
    init = [numpy_helper.from_array(scale.to(dtype).numpy().reshape(()), "s"), numpy_helper.from_array(np.int8(0), "z")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", ort_type, list(x.shape))],
                              [helper.make_tensor_value_info("y", ort_type, list(x.shape))], init)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    ours = fake_quantize_int8(torch.from_numpy(x), scale).numpy()
    np.testing.assert_array_equal(ours, expected)
