"""Hub, telemetry and progress-bar switches, set before anything imports transformers or huggingface_hub.

Imported by `gateway/__init__.py` and `finetune/__init__.py`, so every entry point is offline by the time
any model code loads.  Nothing in this product may reach a network beyond its own clients.
"""

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "TOKENIZERS_PARALLELISM": "false",
    # Progress bars (model loading, GGUF conversion) would break the logs' one-JSON-object-per-line promise.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}

for _name, _value in OFFLINE_ENV.items():
    os.environ[_name] = _value
