"""A pruned model as one compressed, self-describing file, and back.
"""

from jaxprune._src.io.export import (
    CompressedFormatError,
    ExportInfo,
    export_compressed,
    export_info,
    load_compressed,
)

__all__ = [
    "CompressedFormatError",
    "ExportInfo",
    "export_compressed",
    "export_info",
    "load_compressed",
]
