"""kphi3_model: the KPhi-3 model family on current transformers, on the fused grouped kernels.

Importing this package registers ``model_type = "kphi3"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and
``AutoModelForTokenClassification``, so a released checkpoint directory loads with
``AutoModelForCausalLM.from_pretrained(path)``, without ``trust_remote_code`` (a registered class
wins over the ``auto_map`` of the checkpoint's config.json).

Read in this order: ``configuration_kphi3.py`` (fields, validation) -> ``modeling_kphi3.py`` (the
model) -> ``patching.py`` (``apply_kphi3_kernels`` for models built by other code).
"""
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_kphi3 import KPhi3Config
from .modeling_kphi3 import (
    KPhi3ForCausalLM,
    KPhi3ForSequenceClassification,
    KPhi3ForTokenClassification,
    KPhi3Model,
    KPhi3PreTrainedModel,
)
from .patching import apply_kphi3_kernels

AutoConfig.register(KPhi3Config.model_type, KPhi3Config, exist_ok=True)
AutoModel.register(KPhi3Config, KPhi3Model, exist_ok=True)
AutoModelForCausalLM.register(KPhi3Config, KPhi3ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(KPhi3Config, KPhi3ForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(KPhi3Config, KPhi3ForTokenClassification, exist_ok=True)

__all__ = [
    "KPhi3Config",
    "KPhi3PreTrainedModel",
    "KPhi3Model",
    "KPhi3ForCausalLM",
    "KPhi3ForSequenceClassification",
    "KPhi3ForTokenClassification",
    "apply_kphi3_kernels",
]
