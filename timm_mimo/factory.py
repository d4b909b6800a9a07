"""``timm.create_model`` with errors that say what to do, for train.py and validate.py.

Our registered names already fail loudly inside timm for unpublished or uncached weights
(``timm_mimo.models._pretrained``); this adds one-line errors for what happens before our code runs: an
unknown architecture (a plugin not imported), an unknown tag, and ``hf-hub:`` downloads that fail.
"""
import torch.nn as nn

import timm
from timm.models import split_model_name_tag

from .models._pretrained import _download_error


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):
            raise ValueError(
                f'{message}: not in timm\'s registry. timm_mimo architectures are registered by "import timm_mimo", '
                f'which must run before timm.create_model (for hf-hub: and local-dir: names too)') from e
        if message.startswith('Invalid pretrained tag'):
            arch = split_model_name_tag(model_name)[0]
            tags = [n.partition('.')[2] for n in timm.models.get_arch_pretrained_cfgs(arch)]
            raise ValueError(f'{message} Tags: {", ".join(tags) or "none"}') from e
        raise
    except Exception as e:  # noqa: BLE001  (huggingface_hub's download errors, for hf-hub: names)
        repo = model_name.partition(':')[2] if model_name.startswith(('hf-hub:', 'hf_hub:')) else model_name
        error = _download_error(model_name, repo, e)
        if error is None:
            raise
        raise error from e
