"""The local engine: our continuous-batching runner over a transformers model, in this process.

engine.py       LocalEngine: the Engine protocol; loads the model on its own thread, validates, submits
scheduler.py    the engine thread: continuous batching, recovery from failed steps
runner.py       the fused forward pass over a slot KV cache, per-row LoRA
quantized.py    weight-only int4/int8 decode copies (CPU) · precision.py: device, dtype, quantization
sizing.py       batch, prefill step, queue and tenant share sized from the model, memory and cores
lora.py         peft adapters as per-layer (A, scaled B) pairs
sampling.py     per-row sampling with its own seeded stream · detokenizer.py: incremental text, stops
"""
