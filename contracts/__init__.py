"""What the gateway (the HTTP process) and the fine-tuning worker must agree on, in one place.

Both import this package; it imports neither of them (a test keeps it so).  Each module is one contract:

    hyperparameters  every fine-tuning setting: type, range, default, help; validation that names every bad
                     field; the mapping onto the trainer's settings
    lora             the projections a LoRA adapter may target (what the engine can serve)
"""
