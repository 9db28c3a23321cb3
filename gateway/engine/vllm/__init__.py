"""vLLM behind the Engine protocol: a managed server per base model, or remote replicas (see engine.py)."""
