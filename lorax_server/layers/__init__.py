"""Building blocks of the models: RMSNorm, rotary embeddings, paged attention, packed linear projections, batched multi-LoRA."""
