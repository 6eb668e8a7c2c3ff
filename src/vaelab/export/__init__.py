"""Sharing and deploying a trained model: the weights-only export folder with its model card
(:func:`export_run`; read back by :func:`vaelab.from_pretrained`), and its ONNX encoder and decoder."""

from .folder import ExportResult, export_run
from .onnx import ONNX_PARAMS, GraphInfo, OnnxUnsupported, export_onnx

__all__ = ["ONNX_PARAMS", "ExportResult", "GraphInfo", "OnnxUnsupported", "export_onnx", "export_run"]
