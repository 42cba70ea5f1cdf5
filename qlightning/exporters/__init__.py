"""Exporters: a converted PT2E program written as ONNX (QDQ) or PT2, verified in its runtime."""

from qlightning.exporters.api import export, report_path
from qlightning.exporters.registry import ExportFormat, available_formats, get_format, register_format

__all__ = ["ExportFormat", "available_formats", "export", "get_format", "register_format", "report_path"]
