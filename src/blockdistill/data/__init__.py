"""Host-side data: tokenizers, corpora, packing, the on-disk token store and the Grain
pipeline over it."""
