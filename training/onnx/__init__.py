"""ONNX library code: export with parity check, float16-stored weights, ONNX Runtime inference and timing, INT8
quantization building blocks. (Absolute ``import onnx`` inside this package is the pip package.)"""
