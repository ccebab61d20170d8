"""Reference numbers for wildlong's optimiser (tests/fixtures/train/optim.json), from PyTorch
and HF transformers:
  - torch.optim.AdamW (lr from HF's cosine-with-min-lr schedule with warm-up, stepped as the
    Trainer steps it) on two parameters with fixed gradients, after each of 6 steps;
  - torch.nn.utils.clip_grad_norm_ on those gradients (norm before, gradients after).

    python scripts/make_train_optim_fixture.py   # torch 2.x, transformers 4.4x+/5.x
"""
import json
import math

import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

torch.manual_seed(0)
a = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))
b = torch.nn.Parameter(torch.tensor([[0.5, -0.25], [2.0, 0.0]], dtype=torch.float64))
grads = [
    [[0.1 * (k + 1) * math.sin(i + k) for i in range(5)], [[0.3 - 0.1 * k, 1.0], [-0.5, 0.05 * k]]]
    for k in range(6)
]
opt = torch.optim.AdamW([a, b], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6, min_lr_rate=0.1)
steps = []
for k in range(6):
    lr = opt.param_groups[0]["lr"]
    a.grad = torch.tensor(grads[k][0], dtype=torch.float64)
    b.grad = torch.tensor(grads[k][1], dtype=torch.float64)
    opt.step()
    sched.step()
    steps.append({"lr": lr, "a": a.detach().tolist(), "b": b.detach().tolist()})

ga = torch.tensor(grads[5][0], dtype=torch.float64)
gb = torch.tensor(grads[5][1], dtype=torch.float64)
pa, pb = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
pa.grad, pb.grad = ga.clone(), gb.clone()
norm = torch.nn.utils.clip_grad_norm_([pa, pb], max_norm=0.5)
out = {
    "source": f"torch {torch.__version__}, transformers get_cosine_with_min_lr_schedule_with_warmup",
    "init": {"a": torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).tolist(), "b": [[0.5, -0.25], [2.0, 0.0]]},
    "adamw": {"lr": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
              "warmup": 2, "total": 6, "min_ratio": 0.1},
    "grads": grads,
    "steps": steps,
    "clip": {"max_norm": 0.5, "norm": norm.item(), "a": pa.grad.tolist(), "b": pb.grad.tolist()},
}
with open("tests/fixtures/train/optim.json", "w") as f:
    json.dump(out, f, indent=1)
print("wrote tests/fixtures/train/optim.json")
