"""ConvBERT in PyTorch: the model, data building, ELECTRA pre-training and GLUE fine-tuning."""

__version__ = "0.1.0"

__all__ = ["ConvBertConfig", "ConvBertModel", "ConvBertOutput", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `convbert build-data` and `--help` start without importing torch.
    if name == "ConvBertConfig":
        from convbert.model.config import ConvBertConfig

        return ConvBertConfig
    if name in ("ConvBertModel", "ConvBertOutput"):
        from convbert.model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'convbert' has no attribute {name!r}")
