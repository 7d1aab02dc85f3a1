from .configuration_poly_bert import PolyBertConfig
from .modeling_poly_bert import (
    PolyBertForMaskedLM,
    PolyBertForSequenceClassification,
    PolyBertModel,
    PolyBertPreTrainedModel,
)
