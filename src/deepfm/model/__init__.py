from deepfm.model.deepfm import DeepFM
from deepfm.model.dnn import DNN
from deepfm.model.embedding import FieldEmbedding
from deepfm.model.interaction import BiInteraction

__all__ = ["DeepFM", "DNN", "FieldEmbedding", "BiInteraction"]
