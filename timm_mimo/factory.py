"""``timm.create_model`` with errors that say what to do: an unknown architecture (a plugin not imported), an
unknown tag, weights that are not published or not cached offline. train.py and validate.py build models here."""
import torch.nn as nn

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag

from .cli import http_one_line, redact


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` whose failures to find weights or an architecture are one-line ``ValueError``s.

    - unpublished or private repository, missing revision or weights file: the message names the repository;
    - offline (``HF_HUB_OFFLINE=1`` or no network) without a cached copy: it says so, with the cache folder;
    - an architecture timm does not know (``hf-hub:`` / ``local-dir:`` of one of ours without
      ``import timm_mimo``, or another plugin's model): it says to import the plugin first.
    """
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)
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
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled,
            HfHubHTTPError) as e:
        repo = _weights_repo(model_name)
        what = f'pretrained weights for {model_name}'
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            from huggingface_hub import constants
            message = (f'{what} ({repo}) are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the '
                       f'Hub could not be reached (offline or HF_HUB_OFFLINE=1): download them once with network '
                       f'access, or load a local export with local-dir:')
        elif isinstance(e, GatedRepoError):
            message = f'{what}: the Hub repository {repo} is gated: accept its terms on the Hub and log in'
        elif isinstance(e, RepositoryNotFoundError):
            message = (f'{what}: the Hugging Face Hub repository {repo} does not exist (not published yet?) or is '
                       f'private (then log in with `hf auth login` or set HF_TOKEN)')
        elif isinstance(e, RevisionNotFoundError):
            message = f'{what}: the revision is not in the Hub repository {repo}'
        elif isinstance(e, EntryNotFoundError):
            message = f'{what}: the Hub repository {repo} has no weights file (model.safetensors)'
        else:
            message = f'{what}: the Hub refused the download of {repo}: {http_one_line(e)}'
        raise ValueError(redact(message)) from e


def _weights_repo(model_name: str) -> str:
    """The repository ``model_name`` loads from: the ``hf-hub:`` id, or the registered tag's ``hf_hub_id``."""
    if model_name.startswith(('hf-hub:', 'hf_hub:')):
        return model_name.partition(':')[2]
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        cfg = None
    return (cfg.hf_hub_id if cfg is not None else None) or model_name


