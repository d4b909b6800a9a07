"""Publishing trained models to the Hugging Face Hub, and loading them back with timm.

Loading (``import timm_mimo`` first: timm has no plugin discovery, our architectures exist in its registry
only once this package is imported, and that holds for ``hf-hub:`` and ``local-dir:`` names too)::

    import timm
    import timm_mimo
    timm.create_model('wrn28_10_mixmo2.cifar100', pretrained=True)   # '<HUB_ORG>/wrn28_10_mixmo2.cifar100'
    timm.create_model('hf-hub:my-org/my-model', pretrained=True)      # any repository in timm's format
    timm.create_model('local-dir:/path/to/export', pretrained=True)   # a folder written by export()

Publishing: :func:`export` turns a training run (``train.py``'s output folder) or a checkpoint into a folder
in timm's Hub format: ``model.safetensors``, ``config.json`` (written by timm's ``save_config_for_hf``) and a
``README.md`` model card with the run's metrics. :func:`push` exports, then lets ``huggingface_hub`` create
the repository and upload exactly those three files. ``hub/export.py`` and ``hub/push.py`` are the command
lines. Weights are read with safetensors or ``torch.load(weights_only=True)`` only (``timm_mimo.models.weights.load_weights``).

:func:`create_model` is ``timm.create_model`` with one-line errors for weights that cannot be found
(unpublished repository, offline without a cached copy) and for architectures timm does not know.
"""
from ..models.factory import create_model  # noqa: F401  (timm.create_model with one-line errors, re-exported)
from .card import DEFAULT_LICENSE, HUB_DATASETS, citation_keys, dataset_tag, metrics_table, model_card, \
    training_recipe  # noqa: F401
from .export import EXPORT_FILES, ExportResult, check_repo_id, export  # noqa: F401
from .push import HubError, push, upload_files  # noqa: F401


def run_script(main, argv=None) -> int:
    """Run a hub script's ``main``: bad input and Hub failures give one ``error:`` line and exit code 2."""
    from ..cli import run_cli
    return run_cli(main, argv, failures={HubError: 2})
