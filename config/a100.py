# A bigger GPU (A100 / H100, sm80+): bfloat16 for teacher and student, a 4x batch, torch.compile.
#   python distill.py config/a100.py
#   python -m torch.distributed.run --standalone --nproc_per_node=8 distill.py config/a100.py
# 32 batch * 512 block * 1 accum = 16,384 tokens per step per GPU (131,072 on 8 GPUs). ~12M tokens
# of data: ~730 steps per epoch on one GPU, ~90 on eight; max_iters=0 derives the total from epochs.
data_dir = "data/wiki_zh"
out_dir = "out-a100"
teacher = "Qwen/Qwen2.5-0.5B"
teacher_dtype = "bfloat16"  # what Qwen2.5 was trained in
dtype = "bfloat16"  # autocast over float32 master weights; no GradScaler needed
compile = True
batch_size = 32
block_size = 512
gradient_accumulation_steps = 1
epochs = 3
max_iters = 0
learning_rate = 3e-4
min_lr = 1e-5
warmup_iters = 150  # ~7% of one GPU's ~2,200 steps
kd_chunk_size = 1024  # larger matmuls in the fused loss; (1024, 151,665) float32 buffers: 2.5 GB
eval_interval = 250
eval_iters = 10  # 10 * 32 = 320 fixed val windows
log_interval = 10
