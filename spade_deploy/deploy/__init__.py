"""Deployment: engines, export to ONNX / TensorRT, the runtime that swaps priors, the export cache."""
