"""Print the README model table from timm's registry: size, cost and the pretrained weights of every model.

    python bench/model_table.py                   # MixMo CNNs and MixViT transformers
    python bench/model_table.py --module mixmo_resnets

Parameters and GMACs (multiply-adds of one 4-D inference pass at the default tag's input size) are measured
on the built model. The last column comes from the registry: the tags whose weights are published
(timm_mimo/models/published.py, linked to their Hub repository) and how many registered tags are not, so
the table states exactly what ``pretrained=True`` can load.
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_mimo  # noqa: F401  (registers the models)

MODULES = ('mixmo_resnets', 'mixvit')


def weights_cell(arch: str) -> str:
    """The published tags of ``arch`` as Hub links, then its registered tags without weights."""
    cfgs = timm.models.get_arch_pretrained_cfgs(arch)
    tags = {name.split('.', 1)[1]: cfg for name, cfg in cfgs.items()}
    published = [f'[`{tag}`](https://huggingface.co/{cfg.hf_hub_id})' for tag, cfg in tags.items() if cfg.hf_hub_id]
    others = [tag for tag, cfg in tags.items() if not cfg.hf_hub_id]
    official = [tag for tag in others if tag.startswith('official_')]
    listed = [f'`{tag}`' for tag in others if tag not in official] + (
        [f'{len(official)} `official_*`'] if official else [])
    return ', '.join(published + ([f'not published: {", ".join(listed)}'] if listed else []))


def model_row(name: str) -> str:
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    params = sum(p.numel() for p in model.parameters())
    # frozen parameters rather than no_grad: the counter's module tracker fails on MixViT's class-attention
    # blocks under no_grad (their class token argument expands a parameter)
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *size))
    gmacs = counter.get_total_flops() / 2 / 1e9  # the counter reports FLOPs = 2 x multiply-adds
    return (f'| `{name}` | {model.num_members} | {size[1]}x{size[2]} | {model.num_classes} | {params / 1e6:.2f} | '
            f'{gmacs:.2f} | {weights_cell(name)} |')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--module', action='append', choices=MODULES, help='model file(s) to list (default: all)')
    args = p.parse_args(argv)
    print('| model | M | input | classes (default tag) | params (M) | GMACs | pretrained weights |')
    print('|---|---|---|---|---|---|---|')
    for module in args.module or MODULES:
        for name in timm.list_models(module=module):  # sorted: each M = 1 model is followed by its MixMo forms
            print(model_row(name))


if __name__ == '__main__':
    main()
