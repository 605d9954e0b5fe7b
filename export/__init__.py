"""ONNX export of mPLUG-Owl3 with a separate visual memory (owl3.export).

``owl3.export.specs`` is torch-free (the runtime reads the same names); the exporter itself imports torch.
"""
