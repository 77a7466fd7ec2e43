"""Building blocks of the models: rotary embeddings, paged attention, packed linear projections, batched multi-LoRA."""
