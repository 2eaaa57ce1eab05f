# The standard run: one T4 (Colab, 15 GB, sm75: float16 but no bfloat16, no flash attention).
#   python prepare.py && python distill.py config/t4.py
# 8 batch * 512 block * 1 accum = 4,096 tokens per step. ~50 MB of zh Wikipedia is ~12M tokens,
# ~2,900 steps per epoch; 3 epochs ~8,800 steps (max_iters=0 derives it from the data).
data_dir = "data/wiki_zh"
out_dir = "out"
teacher = "Qwen/Qwen2.5-0.5B"
teacher_dtype = "float16"  # frozen, forward only: 1 GB of weights; fused SDPA: finite attention
dtype = "float32"  # the student trains in float32; float16 + GradScaler is the faster option
# inductor takes CUDA capability >= 7.0 (a T4 is 7.5); its matmuls stay on cuBLAS, so Triton writes
# only elementwise kernels, which it still builds for sm75 (it dropped only pre-Ampere tensor-core
# matmuls). Not yet run on a T4: where it fails, one warning, and the run goes on eager
compile = True
batch_size = 8
block_size = 512
gradient_accumulation_steps = 1
epochs = 3
max_iters = 0
learning_rate = 3e-4
min_lr = 1e-5
warmup_iters = 500
alpha = 0.5
temperature = 2.0
# each chunk adds its gradient to the head's float32 grad_w (151,936 x 512: 311 MB read and written,
# 622 MB): at 128 that is 32 x 622 MB ~ 20 GB a step, 62 ms at a T4's 320 GB/s, longer than the
# head's float16 products. 512 cuts it to 5 GB for ~1 GB more of (512, 151,665) buffers
kd_chunk_size = 512
eval_interval = 500
eval_iters = 20  # 20 * 8 = 160 fixed val windows, 81,920 tokens
log_interval = 10
