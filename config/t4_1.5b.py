# A stronger teacher on one T4, on top of config/t4.py (config files apply in order):
#   python distill.py config/t4.py config/t4_1.5b.py
# Qwen2.5-1.5B (28 layers, hidden 1536, tied head) in float16. The same command with
# --teacher=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B takes DeepSeek's distilled Qwen (same shape,
# untied head: +0.47 GB); its tokenizer reads the data's Qwen2.5 tokens alike (distill.py checks).
# Memory, an estimate until bench/gpu.py --teacher=Qwen/Qwen2.5-1.5B measures it: config/t4.py's
# ~8 GB with the 0.5B teacher, plus 2.1 GB for the larger fp16 weights (3.1 GB): ~10 GB of 15. Time,
# also an estimate: the teacher's forward grows from ~1.0 to ~3.1 GFLOP per token, so a step costs
# about twice config/t4.py's.
teacher = "Qwen/Qwen2.5-1.5B"
out_dir = "out-1.5b"
