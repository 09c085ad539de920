"""Hugging Face interop: convert a pretrained causal LM to spectral factors, fine-tune it, export it.

One concept per module (each imports only the ones above it; ``transformers`` only inside functions,
through ``loading.require_transformers``, so importing ``tsvd.hf`` never imports it):

- ``loading``: find and load a local HF directory or ``.gguf`` file and its tokenizer (no downloads).
- ``factors``: the factor checkpoint format for any ``nn.Module`` (``save_factors`` / ``load_factors``,
  ``read_factor_meta``; ``FACTORS_FILE``, ``META_FILE``).
- ``conversion``: ``convert_hf`` (load → ``spectralize`` → save with a report), ``save_converted`` /
  ``load_converted`` for HF models with spectral layers.
- ``llama``: tsvd's ``Transformer`` → ``LlamaForCausalLM`` (config map, module-name map as data).
- ``export``: a factor checkpoint or tsvd training checkpoint → HF checkpoint, dense or as factors.
- ``finetune``: ``FineTuner`` / ``finetune`` (steps of ``TorchEngine.train_step``), ``perplexity``.

The functions ``export`` and ``finetune`` re-exported here shadow their modules as attributes of
``tsvd.hf``; reach the modules' other members with ``from tsvd.hf.export import …``.
"""

from tsvd.hf.conversion import (REPORT_JSON, REPORT_TXT, build_hf_model, choose_targets, convert_hf, load_converted,
                                report_dict, save_converted)
from tsvd.hf.export import TOKENIZER_FILES, ExportResult, export, load_tsvd_checkpoint
from tsvd.hf.factors import (FACTORS_FILE, FORMAT, FORMAT_VERSION, META_FILE, apply_layout, is_factor_checkpoint,
                             load_factors, read_factor_meta, save_factors, spectral_layout)
from tsvd.hf.finetune import FineTuner, FinetuneResult, finetune, lm_logits, lm_loss, perplexity, sample_batch
from tsvd.hf.llama import TSVD_TO_LLAMA, llama_config, tsvd_to_llama
from tsvd.hf.loading import load_hf_model, load_tokenizer, require_transformers

__all__ = [
    "FACTORS_FILE", "FORMAT", "FORMAT_VERSION", "META_FILE", "REPORT_JSON", "REPORT_TXT", "TOKENIZER_FILES",
    "TSVD_TO_LLAMA", "ExportResult", "FineTuner", "FinetuneResult", "apply_layout", "build_hf_model",
    "choose_targets", "convert_hf", "export", "finetune", "is_factor_checkpoint", "llama_config", "lm_logits",
    "lm_loss", "load_converted", "load_factors", "load_hf_model", "load_tokenizer", "load_tsvd_checkpoint",
    "perplexity", "read_factor_meta", "report_dict", "require_transformers", "sample_batch", "save_converted",
    "save_factors", "spectral_layout", "tsvd_to_llama",
]
