"""Quantized base weights (`--quantize`): each checkpoint format read into one grouped form (grouped.py) by
bitsandbytes.py and gptq.py; schemes.py pairs the flag with the checkpoint. The layer that multiplies by them is
lorax_server/layers/quantized.py."""
