"""Heads of the original: generator MLM head (tied), discriminator head, and the fine-tuning classifier."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import torch
from torch import nn

from convbert.errors import ConvBertError
from convbert.model.config import WRONG_TYPE, ConvBertConfig, as_field_type
from convbert.model.layers import gelu
from convbert.model.modeling import ConvBertModel, _trunc_normal_


class GeneratorHead(nn.Module):
    """Dense(H_g -> E, GELU) -> LayerNorm -> logits against the shared word-embedding table + output_bias (§3.3).

    Names follow HF's ConvBertForMaskedLM: generator_predictions.{dense, LayerNorm}; `output_bias` plays the role of
    HF's generator_lm_head.bias.
    """

    def __init__(self, config: ConvBertConfig, embedding_size: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, embedding_size)
        self.LayerNorm = nn.LayerNorm(embedding_size, eps=config.layer_norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        _trunc_normal_(self.dense.weight, config.initializer_range)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings_weight: torch.Tensor) -> torch.Tensor:
        """MLM logits over the vocabulary, the output projection tied to `word_embeddings_weight`."""
        h = self.LayerNorm(gelu(self.dense(hidden)))
        return torch.nn.functional.linear(h, word_embeddings_weight, self.output_bias)


class DiscriminatorHead(nn.Module):
    """Dense(H -> H, GELU, trunc-normal init) -> Dense(H -> 1, Glorot init) -> squeeze (§3.5). ELECTRA's HF names."""

    def __init__(self, config: ConvBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)
        _trunc_normal_(self.dense.weight, config.initializer_range)
        nn.init.zeros_(self.dense.bias)
        nn.init.xavier_uniform_(self.dense_prediction.weight)
        nn.init.zeros_(self.dense_prediction.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """One replaced-token logit per position: [B, T, H] -> [B, T]."""
        return self.dense_prediction(gelu(self.dense(hidden))).squeeze(-1)


def _label_count(num_labels) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ConvBertError(f"num_labels = {num_labels!r}: expected an integer >= 1 (1 for regression)")
    return int(num_labels)


class ClassificationHead(nn.Module):
    """The original fine-tuning head: dropout on the [CLS] vector, then one Glorot-initialised linear (§5.1).

    There is no pooler and no hidden dense layer (HF's ConvBertClassificationHead adds both; we do not).
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        num_labels = _label_count(num_labels)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the first ([CLS]) vector: [B, T, H] -> [B, num_labels]."""
        return self.out_proj(self.dropout(hidden[:, 0]))


def write_classifier_files(head_state: dict[str, torch.Tensor], dropout: float, path: str | os.PathLike) -> None:
    """A ClassificationHead's tensors (`out_proj.*`) as `classifier.safetensors` + `head.json` beside an encoder
    folder: what `ConvBertForSequenceClassification.from_pretrained` reads."""
    from convbert.utils import write_json_atomic
    from convbert.weights import save_weights

    path = Path(path)
    save_weights(head_state, path / "classifier.safetensors")
    write_json_atomic(path / ConvBertForSequenceClassification.HEAD_FILE,
                      {"num_labels": int(head_state["out_proj.weight"].shape[0]), "dropout": dropout})


class ConvBertForSequenceClassification(nn.Module):
    """Encoder + ClassificationHead. `num_labels=1` is regression (STS-B)."""

    HEAD_FILE = "head.json"

    def __init__(self, config: ConvBertConfig, num_labels: int, classifier_dropout: float | None = None,
                 encoder: ConvBertModel | None = None):
        super().__init__()
        num_labels = _label_count(num_labels)
        if encoder is not None and not isinstance(encoder, ConvBertModel):
            raise ConvBertError(f"encoder is a {type(encoder).__name__}: expected a ConvBertModel (or None)")
        if classifier_dropout is not None and (isinstance(classifier_dropout, bool)
                                               or not isinstance(classifier_dropout, (int, float))):
            raise ConvBertError(f"classifier_dropout = {classifier_dropout!r}: expected a probability in [0, 1)")
        if encoder is not None and encoder.config.hidden_size != config.hidden_size:
            raise ConvBertError(f"encoder is {encoder.config.hidden_size} wide but config.hidden_size is "
                                f"{config.hidden_size}: pass the encoder's own config (encoder.config)")
        self.num_labels = num_labels
        self.convbert = encoder if encoder is not None else ConvBertModel(config)  # a given one is used as it is
        dropout = config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        if not 0.0 <= dropout < 1.0:
            raise ConvBertError(f"classifier dropout = {dropout!r}: expected a probability in [0, 1)")
        self.classifier = ClassificationHead(config.hidden_size, num_labels, dropout)

    @property
    def config(self) -> ConvBertConfig:
        return self.convbert.config

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_labels] (a score [B, 1] for regression) from the final [CLS] vector. `inputs_embeds`
        [B, T, E] replaces the word-embedding lookup (e.g. for gradient attributions)."""
        encoded = self.convbert(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds)
        return self.classifier(encoded.last_hidden_state)

    @classmethod
    def from_encoder(cls, path: str | os.PathLike, num_labels: int, **config_overrides) -> "ConvBertForSequenceClassification":
        """A pre-trained encoder (HF-layout folder) with a fresh head."""
        encoder = ConvBertModel.from_pretrained(path, **config_overrides)
        model = cls(encoder.config, num_labels, encoder=encoder)
        model.train()
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The encoder in HF layout (loadable by transformers.ConvBertModel) + `classifier.safetensors` + head.json."""
        path = Path(path)
        self.convbert.save_pretrained(path)
        write_classifier_files(self.classifier.state_dict(), self.classifier.dropout.p, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ConvBertForSequenceClassification":
        """A folder written by `save_pretrained` (encoder + `head.json` + head weights), in eval mode."""
        from convbert.interop.hf import check_and_load
        from convbert.weights import load_weights

        path = Path(path)
        head_file = path / cls.HEAD_FILE
        if not head_file.is_file():
            raise ConvBertError(f"{head_file}: not found (a fine-tuned model folder has head.json and "
                                "classifier.safetensors)")
        try:
            head = json.loads(head_file.read_text(encoding="utf-8"))
            num_labels, dropout = as_field_type(head["num_labels"], "int"), as_field_type(head["dropout"], "float")
            if num_labels is WRONG_TYPE or dropout is WRONG_TYPE:
                raise ValueError(f"got num_labels {head['num_labels']!r}, dropout {head['dropout']!r}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConvBertError(f"{head_file}: expected {{'num_labels': int, 'dropout': float}} ({err})") from None
        encoder = ConvBertModel.from_pretrained(path)
        try:
            model = cls(encoder.config, num_labels, classifier_dropout=dropout, encoder=encoder)
        except ConvBertError as err:
            raise ConvBertError(f"{head_file}: {err}") from None
        weights = path / "classifier.safetensors"
        try:
            state = load_weights(weights)
        except ConvBertError:  # the tensors differ from the checksum stored in the file
            raise
        except Exception as err:
            raise ConvBertError(f"{weights}: cannot read the classifier weights: {err}") from None
        check_and_load(model.classifier, state, str(weights))
        model.eval()
        return model
