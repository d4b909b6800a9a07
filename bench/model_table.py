"""Print the README model table: parameters and GMACs (multiply-adds, one 4-D inference pass) per model.

    python bench/model_table.py
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_mimo  # noqa: F401  (registers the models)


def model_row(name: str) -> str:
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *size))
    gmacs = counter.get_total_flops() / 2 / 1e9  # the counter reports FLOPs = 2 x multiply-adds
    return f'| `{name}` | {model.num_members} | {size[1]}x{size[2]} | {model.num_classes} | {params / 1e6:.2f} | {gmacs:.2f} |'


def main():
    print('| model | M | input | classes (default tag) | params (M) | GMACs |')
    print('|---|---|---|---|---|---|')
    names = sorted(timm.list_models(module='mixmo_resnets'), key=lambda n: (n.split('_mixmo')[0], n))
    for name in names:
        print(model_row(name))


if __name__ == '__main__':
    main()
