from deepfm.model.deepfm import DeepFM
from deepfm.model.dnn import DNN
from deepfm.model.embedding import TABLE_KEY, FieldEmbedding, embedding_table
from deepfm.model.interaction import BiInteraction

__all__ = ["DeepFM", "DNN", "FieldEmbedding", "TABLE_KEY", "embedding_table", "BiInteraction"]
