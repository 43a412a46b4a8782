"""The ConvBERT model: configuration, layers, encoder and heads."""

from convbert.model.config import PRESET_GENERATOR_FRACTION, PRESETS, ConvBertConfig
from convbert.model.heads import (
    ClassificationHead,
    ConvBertForSequenceClassification,
    DiscriminatorHead,
    GeneratorHead,
)
from convbert.model.modeling import ConvBertEmbeddings, ConvBertModel, ConvBertOutput

__all__ = [
    "PRESETS", "PRESET_GENERATOR_FRACTION", "ConvBertConfig", "ConvBertEmbeddings", "ConvBertModel", "ConvBertOutput",
    "GeneratorHead", "DiscriminatorHead", "ClassificationHead", "ConvBertForSequenceClassification",
]
