"""ONNX export and TensorRT engine build (owl3.export). Built in the ONNX export issue."""
