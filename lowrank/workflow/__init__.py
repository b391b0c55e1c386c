"""The fine-tuning workflow of the seed notes, on lowrank: conversations (data), chat templates
(template), `lowrank train` (config, methods, batches, train), `lowrank chat` (generate, chat)
and `lowrank web` (web_app). YAML, Streamlit and transformers are optional: pip install 'lowrank[workflow]'."""
