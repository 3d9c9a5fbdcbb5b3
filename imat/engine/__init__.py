"""imat.engine: model.onnx + images -> FAISS index -> results.

Never imports the training stack (jax, flax, optax, tensorflow, tensorflow_datasets):
serving needs only onnxruntime, faiss, numpy and pillow.
"""

from imat.engine.embedder import EmbedError, EmbedResult, EmbedTimings
from imat.engine.engine import Engine
from imat.engine.gallery_index import GalleryIndex, load_index
from imat.engine.index_choice import choose_index_type
from imat.engine.session import ModelMetadata, ModelSession

__all__ = [
    "Engine",
    "EmbedError",
    "EmbedResult",
    "EmbedTimings",
    "GalleryIndex",
    "ModelMetadata",
    "ModelSession",
    "choose_index_type",
    "load_index",
]
