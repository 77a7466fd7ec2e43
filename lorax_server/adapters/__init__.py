"""LoRA adapters on the shard: PEFT format parsing, weight loading, and the registry of loaded adapters."""
