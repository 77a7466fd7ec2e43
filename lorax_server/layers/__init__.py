"""Building blocks of the models: rotary embeddings, paged attention, tensor-parallel linears."""
