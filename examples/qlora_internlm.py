"""lowrank train examples/qlora_internlm.py

The seed notes' run (XTuner's internlm_chat_7b_qlora_oasst1_e3) as a lowrank config: QLoRA
on InternLM-Chat-7B with the InternLM chat template, 3 epochs. Fields are module-level
names, as in an XTuner config; `config = {...}` works too.
"""

model = "/root/ft-oasst1/internlm-chat-7b"
data = "/root/ft-oasst1/oasst1.json"
output_dir = "./work_dirs/internlm_chat_7b_qlora_oasst1_e3"

method = "qlora"
method_options = {"r": 64, "alpha": 16, "dropout": 0.1}  # XTuner's LoRA settings for this config
nf4 = {"blocksize": 64, "double_quant": True}
template = "internlm"
dtype = "bfloat16"
trust_remote_code = True  # internlm-chat-7b ships its model code (its config's auto_map); transformers needs the flag

epochs = 3
lr = 2e-4
schedule = "cosine"
warmup_ratio = 0.03
batch_size = 1
grad_accum = 16
max_length = 2048
activation_checkpointing = True
paged_optimizer = False  # true: AdamW with its states in CUDA managed memory (lowrank.optim.PagedAdamW); on CPU, AdamW
