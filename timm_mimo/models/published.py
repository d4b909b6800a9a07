"""The pretrained tags whose weights are published on the Hugging Face Hub: the one place to edit.

Each entry is ``'<arch>.<tag>'``; its weights live in ``timm_mimo.constants.hub_id(arch, tag)``
(``'<HUB_ORG>/<arch>.<tag>'``). Only these tags get an ``hf_hub_id``, so only they are listed by
``timm.list_models(pretrained=True)`` and ``timm.list_pretrained()``; ``pretrained=True`` on any other
registered tag raises an error naming its repository instead of building random weights. Publishing a
repository (docs/hub.md, "Publish the paper's weights") needs one new line here and nothing else; the
README's model table (``python bench/model_table.py``) is generated from the registry this list shapes.

A mirror or a fork that publishes its own set under another ``TIMM_MIMO_HUB_ORG`` adds tags with the
environment variable ``TIMM_MIMO_PUBLISHED`` (comma-separated ``arch.tag`` names, read once at import).
"""

PUBLISHED = (
    # no repository is published yet
)
