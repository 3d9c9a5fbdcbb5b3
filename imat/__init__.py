"""imat: fashion image retrieval on iMaterialist Fashion 2020.

Stages (one package each, connected by files on disk):
data_tools (Kaggle folder -> prepared dataset), train_jax (-> Orbax checkpoint),
export (-> model.onnx), engine (model.onnx + images -> FAISS index -> results), cli.
"""

__version__ = "0.1.0"
