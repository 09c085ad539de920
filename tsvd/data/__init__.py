"""Offline data: corpus files → tokenizer → token shards on disk → random training windows.

One concept per module (each imports only the ones above it):

- ``corpus``: ``data.corpus`` entries (``"stdlib"``, folders, files) → documents, in a reproducible order.
- ``split``: documents → train / val / test by tokens, with a floor on held-out documents.
- ``shards``: the dataset on disk (``meta.json``, ``*.bin``): ``read_meta``, ``load_data``.
- ``prepare``: ``prepare_data(cfg)`` builds ``data.dir`` once (the tokenizer sees training documents only).
- ``batches``: ``BatchSampler`` (seeded, resumable), ``val_batches``, ``unigram_loss``.
"""

from tsvd.data.batches import BatchSampler, unigram_loss, val_batches
from tsvd.data.corpus import CorpusStats, Document, read_corpus
from tsvd.data.prepare import fingerprint, prepare_data
from tsvd.data.shards import FORMAT_VERSION, META_FILE, DataMeta, Dataset, load_data, read_meta
from tsvd.data.split import split_order, split_sizes

__all__ = [
    "FORMAT_VERSION", "META_FILE", "BatchSampler", "CorpusStats", "DataMeta", "Dataset", "Document", "fingerprint",
    "load_data", "prepare_data", "read_corpus", "read_meta", "split_order", "split_sizes", "unigram_loss",
    "val_batches",
]
