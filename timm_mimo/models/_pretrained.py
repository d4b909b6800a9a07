"""Pretrained weights that exist, and errors that say so when they do not.

timm's registry calls a tag pretrained when its cfg has a weight source (``url``, ``file`` or
``hf_hub_id``). :func:`hub_cfgs` gives an ``hf_hub_id`` to the published tags only (``published.py``),
so ``timm.list_models(pretrained=True)`` lists exactly those. For every other tag timm would log a
warning and return random weights; :func:`pretrained_weights`, which the model files wrap around
``build_model_with_cfg``, turns that and every failed download into one :class:`PretrainedWeightsError`
line naming the repository. This runs inside the registered model functions, so it holds for plain
``timm.create_model(...)``, not only for timm_mimo's scripts.
"""
import logging
import os
from contextlib import contextmanager
from typing import Dict, FrozenSet, Optional

from timm.models import resolve_pretrained_cfg

from ..constants import hub_id
from .published import PUBLISHED

__all__ = ['PUBLISHED_ENV', 'PretrainedWeightsError', 'published_tags', 'hub_cfgs', 'pretrained_weights']

PUBLISHED_ENV = 'TIMM_MIMO_PUBLISHED'
_logger = logging.getLogger(__name__)
_SOURCES = ('url', 'file', 'hf_hub_id', 'state_dict')


class PretrainedWeightsError(ValueError):
    """``pretrained=True`` cannot give the registered weights: unpublished, not cached offline, refused."""


def _read_published() -> FrozenSet[str]:
    """``published.py`` + the names of ``TIMM_MIMO_PUBLISHED``. Read at import, so a name that is not
    ``<arch>.<tag>`` is skipped with a warning: an error here would stop ``import timm_mimo`` itself."""
    extra = [name.strip() for name in os.environ.get(PUBLISHED_ENV, '').split(',') if name.strip()]
    named = [name for name in extra if name.count('.') == 1 and all(name.split('.'))]
    for name in extra:
        if name not in named:
            _logger.warning(f'{PUBLISHED_ENV}: {name!r} is not an <arch>.<tag> name: ignored')
    return frozenset(PUBLISHED) | frozenset(named)


_PUBLISHED = _read_published()


def published_tags() -> FrozenSet[str]:
    """Every ``'arch.tag'`` whose Hub repository is published (``published.py`` + ``TIMM_MIMO_PUBLISHED``)."""
    return _PUBLISHED


def hub_cfgs(cfgs: Dict[str, dict]) -> Dict[str, dict]:
    """``{'arch.tag': cfg}`` for ``generate_default_cfgs``: published tags without a source get their
    ``hf_hub_id``; unpublished ones stay without a source, so timm does not list them as pretrained."""
    out = {}
    for name, cfg in cfgs.items():
        arch, _, tag = name.partition('.')
        if not tag:
            raise ValueError(f'pretrained cfg {name!r} has no tag: Hub repositories are named <arch>.<tag>')
        has_source = any(cfg.get(k) for k in _SOURCES)
        out[name] = {**cfg, 'hf_hub_id': hub_id(arch, tag)} if name in _PUBLISHED and not has_source else cfg
    return out


def _cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _download_error(name: str, repo: str, err: BaseException) -> Optional[PretrainedWeightsError]:
    """One line for a huggingface_hub failure to fetch ``repo``, or None for other errors."""
    from huggingface_hub import utils as hf
    what = f'pretrained weights for {name}'
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return PretrainedWeightsError(
            f'{what}: {repo} is published but not in the local Hugging Face cache ({_cache_dir()}) and the Hub '
            f'cannot be reached (offline or HF_HUB_OFFLINE=1): download it once with network access '
            f'(hf download {repo})')
    if isinstance(err, hf.RepositoryNotFoundError):  # gated repositories included
        return PretrainedWeightsError(
            f'{what}: the Hub has no repository {repo} (or it is private or gated: log in with `hf auth login`)')
    if isinstance(err, (hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return PretrainedWeightsError(f'{what}: the Hub repository {repo} has no weights file at its revision')
    if isinstance(err, hf.HfHubHTTPError):
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return PretrainedWeightsError(f'{what}: the Hub refused the download of {repo}: {first}')
    return None


@contextmanager
def pretrained_weights(variant: str, pretrained: bool, kwargs: dict):
    """Around ``build_model_with_cfg(cls, variant, pretrained, **kwargs)`` of a registered model function.

    Before building: ``pretrained=True`` on a tag with no weight source (an unpublished repository, or
    an overlay without ``file``/``url``) raises instead of letting timm build random weights. While
    building: a failed Hub download becomes one line naming the repository.
    """
    if not pretrained:
        yield
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    tag = cfg.tag or ''
    name = f'{variant}.{tag}' if tag else variant
    repo = cfg.hf_hub_id or hub_id(variant, tag)
    if not any(getattr(cfg, k, None) for k in _SOURCES):
        published = sorted(n for n in _PUBLISHED if n.split('.')[0] == variant)
        raise PretrainedWeightsError(
            f'pretrained weights for {name}: the Hub repository {repo} is not published (published tags of '
            f'{variant}: {", ".join(published) or "none"}; the list is timm_mimo/models/published.py); build it '
            f'with pretrained=False, or load other weights with hf-hub:<repo> or local-dir:<folder>')
    try:
        yield
    except Exception as err:  # noqa: BLE001  (only huggingface_hub's download errors are translated)
        translated = _download_error(name, repo, err)
        if translated is None:
            raise
        raise translated from err
