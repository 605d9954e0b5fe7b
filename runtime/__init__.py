"""Torch-free inference on ONNX Runtime and TensorRT (owl3.runtime). Must never import torch."""
