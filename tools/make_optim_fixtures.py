"""Reference for pocl's AdamW + global grad-norm clip: torch.optim.AdamW (float64) with the
no-decay rule for 1-D parameters and torch.nn.utils.clip_grad_norm_. Writes
tests/fixtures/optim/adamw.json. Run by hand: python tools/make_optim_fixtures.py"""
import json, math, pathlib
import torch

torch.manual_seed(0)
w = torch.randn(2, 3, dtype=torch.float64).float().double()
b = torch.randn(3, dtype=torch.float64).float().double()
init = {"w": w.flatten().tolist(), "b": b.flatten().tolist()}
w.requires_grad_(); b.requires_grad_()
opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}],
                        lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
steps = []
for k in range(4):
    lr = 1e-2 * (1 + math.cos(math.pi * k / 4)) / 2 + 1e-4
    for g in opt.param_groups:
        g["lr"] = lr
    gw = torch.randn(2, 3, dtype=torch.float64) * (3.0 if k % 2 == 0 else 0.1)
    gb = torch.randn(3, dtype=torch.float64) * (3.0 if k % 2 == 0 else 0.1)
    # Gradients rounded to f32 so both sides start from identical inputs.
    gw, gb = gw.float().double(), gb.float().double()
    w.grad, b.grad = gw.clone(), gb.clone()
    norm = torch.nn.utils.clip_grad_norm_([w, b], 1.0).item()
    opt.step()
    steps.append({"lr": lr, "grad_w": gw.flatten().tolist(), "grad_b": gb.flatten().tolist(), "norm": norm,
                  "w": w.detach().flatten().tolist(), "b": b.detach().flatten().tolist()})
out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/optim/adamw.json"
out.write_text(json.dumps({"init": init, "steps": steps}, indent=1))
print("wrote", out)
