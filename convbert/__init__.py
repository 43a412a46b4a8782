"""ConvBERT in PyTorch: the model, data building, ELECTRA pre-training and GLUE fine-tuning."""

__version__ = "0.1.0"

from convbert.model.config import ConvBertConfig  # noqa: E402
from convbert.model.modeling import ConvBertModel, ConvBertOutput  # noqa: E402

__all__ = ["ConvBertConfig", "ConvBertModel", "ConvBertOutput", "__version__"]
