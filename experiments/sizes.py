"""
The shapes and steps of experiments/kd_vs_ce.py, by size: data only, so that the other experiments
(prune_calibration.py) read the same ones without importing a script.

(tokenizer vocabulary, teacher shape and steps, student shape and steps, shared training settings,
the on-policy arms' continuation length). The student is prunable from the teacher: the same
head_dim (64), fewer of everything.
"""

SIZES = {
    "full": dict(
        vocab=4096,
        teacher=dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=768,
                     max_iters=1200),
        student=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=128, intermediate_size=384,
                     max_iters=600),
        train=dict(block_size=128, batch_size=16, learning_rate=2e-3, min_lr=1e-4, warmup_iters=50,
                   eval_interval=50, eval_iters=20, prune_windows=512),
        onpolicy_tokens=32,  # a quarter of each window
    ),
    "tiny": dict(
        vocab=300,
        teacher=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                     max_iters=12),
        student=dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=16, intermediate_size=32,
                     max_iters=8),
        train=dict(block_size=32, batch_size=4, learning_rate=3e-3, min_lr=1e-4, warmup_iters=2,
                   eval_interval=4, eval_iters=2, prune_windows=8),
        onpolicy_tokens=8,
    ),
}
# the pruned start's learning rate: the scratch arms' (docs/pruning.md has the sweep)
PRUNE_LR = {"full": 2e-3, "tiny": 3e-3}
