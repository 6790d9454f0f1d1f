"""Using a trained model: loading it, one predictor interface over PyTorch and ONNX Runtime,
prediction on image files, and export to ONNX (fp32 and static INT8).

``fedlens predict`` and ``fedlens export`` are thin commands over this package; an HTTP
service sits on :class:`Predictor` the same way.
"""

from ._export import EXPORT_FILE, FASHION_MNIST, FP32_FILE, INT8_FILE, OPSET, ExportOptions, ExportRefused, export_model
from ._files import FileResult, InputFiles, expand_inputs, predict_files
from ._fold import FoldResult, fold_for_inference
from ._loading import NOT_PRIVATE, LoadedModel, load_model, model_card
from ._predictor import OnnxPredictor, Predictor, TorchPredictor, load_predictor, read_onnx_metadata, stack_images, top_k

__all__ = [
    "EXPORT_FILE",
    "ExportOptions",
    "ExportRefused",
    "FASHION_MNIST",
    "FP32_FILE",
    "FileResult",
    "FoldResult",
    "INT8_FILE",
    "InputFiles",
    "LoadedModel",
    "NOT_PRIVATE",
    "OPSET",
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "expand_inputs",
    "export_model",
    "fold_for_inference",
    "load_model",
    "load_predictor",
    "model_card",
    "predict_files",
    "read_onnx_metadata",
    "stack_images",
    "top_k",
]
