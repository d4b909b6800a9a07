"""Pictures of mixed training samples: one PNG grid, one row per sample (Pillow only).

Columns: the image, its partner, the mask (the partner's weight, white = partner), the mixed image, then
lambda (the image's label share) over the image's pixel share, 1 - mean(mask): they differ where the mask
does not follow lambda exactly (AutoMix's mask loss only pulls the batch mean to within a margin).
:func:`save_mix_grid` draws any such set; the ``*_samples`` helpers build the set for each way of mixing
in this package:

- :func:`mimo_samples`: MixMo masks (M >= 2) of a :class:`~timm_mimo.batch.MimoBatch`: members 0 and 1,
  the mask of member 1 on the mixing grid shown at pixel size. MixMo mixes *features* after the member
  encoders; the mixed column is the same mask applied to pixels, for illustration.
- :func:`msda_samples`: pixel Mixup / CutMix drawn the way :func:`timm_mimo.msda.msda_mix` draws them
  (lambda ~ Beta(alpha, alpha); CutMix: a partner box of area 1 - lambda, lambda re-read as the mask mean).
- AutoMix (:mod:`timm_mimo.automix`) returns its own backbone-branch samples (``vis=True``).
"""
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .mixing import box_masks, sample_beta
from .msda import check_msda_mode

COLUMNS = ('image', 'partner', 'mask', 'mixed')


def mimo_samples(inputs: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Samples of a MIMO batch: inputs (B, M, C, H, W), masks (B, M, h, w) with M >= 2 (members 0 and 1)."""
    if inputs.ndim != 5 or inputs.shape[1] < 2:
        raise ValueError(f'MixMo pictures need member inputs (B, M >= 2, C, H, W), got {list(inputs.shape)}')
    x0, x1 = inputs[:, 0].float(), inputs[:, 1].float()
    mask = F.interpolate(masks[:, 1:2].float(), size=x0.shape[-2:], mode='nearest')
    # the own share: member 0's weight relative to the pair shown (equals 1 - mask for M = 2)
    own = masks[:, 0].float().mean((1, 2)) / masks[:, :2].float().sum(1).mean((1, 2)).clamp_min(1e-12)
    return dict(image=x0, partner=x1, mask=mask, mixed=x0 + mask * (x1 - x0), lam=own)


def msda_samples(images: torch.Tensor, mode: str, alpha: float,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Mixup / CutMix samples of images (N, C, H, W) with partners from the same batch."""
    check_msda_mode(mode)
    images = images.float()
    n, _, h, w = images.shape
    partner = torch.randint(0, n, (n,), generator=generator, device=images.device)
    lam = sample_beta(n, alpha, generator, images.device)
    if mode == 'cutmix':
        own = 1 - box_masks(1 - lam, (h, w), generator)
    else:
        own = lam[:, None, None].expand(n, h, w)
    mask = (1 - own)[:, None]
    x1 = images[partner]
    return dict(image=images, partner=x1, mask=mask, mixed=images + mask * (x1 - images),
                lam=own.mean((1, 2)))


def _to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N, H, W, 3) uint8 RGB."""
    x = x.detach().float().cpu()
    c = x.shape[1]
    mean_t = torch.tensor(list(mean)[:c] if len(mean) >= c else [mean[0]] * c)[:, None, None]
    std_t = torch.tensor(list(std)[:c] if len(std) >= c else [std[0]] * c)[:, None, None]
    x = (x * std_t + mean_t).clamp(0, 1)
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        x = x[:, :3] if c > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - c, -1, -1)], 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _mask_to_uint8(mask: torch.Tensor, size) -> torch.Tensor:
    m = mask.detach().float().cpu()
    if m.ndim == 3:
        m = m[:, None]
    m = F.interpolate(m[:, :1], size=tuple(size), mode='nearest').clamp(0, 1)
    return (m * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def save_mix_grid(path, samples: Dict[str, torch.Tensor], mean: Sequence[float] = (0.0,),
                  std: Sequence[float] = (1.0,), max_rows: int = 8, scale: int = 3, title: str = '') -> Path:
    """Write a PNG grid: rows = samples, columns = image | partner | mask | mixed, then lambda over the pixel
    share of the image (1 - mean mask).

    ``samples``: 'image', 'partner', 'mixed' (N, C, H, W) normalised with ``mean`` / ``std``; 'mask'
    (N, 1, h, w) or (N, h, w) in [0, 1], the partner's weight (resized to the image); 'lam' (N,) or a float,
    the image's own share. Returns the path. The folder is created; the file is replaced atomically.
    """
    from PIL import Image, ImageDraw

    missing = [k for k in (*COLUMNS, 'lam') if k not in samples]
    if missing:
        raise ValueError(f'mix samples lack {missing}')
    n = min(int(samples['image'].shape[0]), max_rows)
    if n < 1:
        raise ValueError('no samples to draw')
    h, w = samples['image'].shape[-2:]
    columns = [_to_uint8(samples[k][:n], mean, std) if k != 'mask' else _mask_to_uint8(samples[k][:n], (h, w))
               for k in COLUMNS]
    lam = torch.as_tensor(samples['lam']).detach().float().cpu().reshape(-1)
    lam = lam.expand(n) if lam.numel() == 1 else lam[:n]

    own_px = 1 - columns[2][..., 0].float().mean((1, 2)) / 255
    cell_h, cell_w, pad, label_w, header = h * scale, w * scale, 4, 72, 16
    title_h = 14 if title else 0
    width = pad + len(COLUMNS) * (cell_w + pad) + label_w
    height = title_h + header + pad + n * (cell_h + pad)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 1), title, fill=(0, 0, 0))
    for j, name in enumerate(COLUMNS):
        draw.text((pad + j * (cell_w + pad), title_h + 2), name, fill=(0, 0, 0))
    draw.text((pad + len(COLUMNS) * (cell_w + pad), title_h + 2), 'lambda / px', fill=(0, 0, 0))
    for i in range(n):
        top = title_h + header + pad + i * (cell_h + pad)
        for j, col in enumerate(columns):
            tile = Image.fromarray(col[i].numpy(), 'RGB').resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), top))
        draw.text((pad + len(COLUMNS) * (cell_w + pad), top + cell_h // 2 - 12),
                  f'{float(lam[i]):.3f}\n{float(own_px[i]):.3f}', fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    canvas.save(tmp, format='PNG')
    tmp.replace(path)
    return path
