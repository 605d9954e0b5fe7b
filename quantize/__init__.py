"""Quantization recipes and GPTQ / INT8 math (owl3.quantize). Built in the quantization issue."""
