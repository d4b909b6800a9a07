"""Upload an export folder to the Hugging Face Hub with huggingface_hub.

timm's ``push_to_hf_hub`` saves the model it is given and uploads a fresh folder; this pushes the folder that
:func:`~timm_mimo.hub.export.export` wrote and checked (weights read back from a run, the run's card), so it
calls huggingface_hub's ``create_repo`` / ``create_branch`` / ``upload_folder`` itself, on those files only.
"""
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from .. import rundir
from ..cli import hf_token, http_one_line, redact
from .export import EXPORT_FILES, OPTIONAL_FILES, REPORT_DIR, check_repo_id, export


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message is one line and never holds the token."""


def upload_files(folder: Path) -> List[str]:
    """The files of an export folder that push uploads: regular files inside it, never links out of it."""
    folder = Path(folder).resolve()
    names = list(EXPORT_FILES) + [f for f in OPTIONAL_FILES if (folder / f).exists() or (folder / f).is_symlink()] + \
        [f'{REPORT_DIR}/{p.name}' for p in sorted((folder / REPORT_DIR).glob('*.png'))]
    for name in names:
        rundir.check_regular_file_inside(folder / name, folder, 'upload')
    return names


def _size(num_bytes: int) -> str:
    return f'{num_bytes / 1e6:.1f} MB' if num_bytes >= 1e6 else f'{num_bytes / 1e3:.1f} kB'


def push(source, repo_id: str, *, revision: Optional[str] = None, private: bool = False,
         commit_message: Optional[str] = None, dry_run: bool = False, export_dir: Optional[str] = None,
         overwrite: bool = False, log: Callable[[str], None] = print, as_is: bool = False,
         **export_options) -> Optional[str]:
    """Export ``source`` and upload the folder to the Hub repository ``repo_id``; returns the commit URL.
    ``as_is``: ``source`` is a finished export folder (hub/convert_official.py's, say), uploaded unchanged
    once it loads back as a timm model.

    huggingface_hub does the work (``HfApi.create_repo``, ``create_branch`` for a new ``revision``,
    ``upload_folder`` restricted to :data:`EXPORT_FILES`), with the token of ``HF_TOKEN`` or of
    ``hf auth login``; it is never printed or written. ``dry_run`` does everything but contact the Hub.
    The export goes to ``export_dir`` (kept) or to a temporary folder (removed).
    """
    check_repo_id(repo_id)
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise ValueError(f'revision {revision!r} is not a branch name')
    has_token = hf_token() is not None
    if not dry_run and not has_token:
        raise HubError('no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (nothing was uploaded)')
    with tempfile.TemporaryDirectory(prefix='timm_mimo_push-') as tmp:
        if as_is:
            folder = Path(source)
            name = rundir.load_model_folder(folder).pretrained_cfg.get('architecture')  # it loads: weights read safely
        else:
            folder = Path(export_dir) if export_dir else Path(tmp) / 'export'
            result = export(source, folder, repo_id=repo_id, overwrite=overwrite, **export_options)
            name = f'{result.architecture}{"." + result.tag if result.tag else ""}'
        files = upload_files(folder)
        message = commit_message or f'Add {name} weights (timm_mimo export)'
        where = f'{repo_id}' + (f'@{revision}' if revision else '') + (' (private)' if private else '')
        sizes = ', '.join(f'{f} ({_size((folder / f).stat().st_size)})' for f in files)
        if dry_run:
            log(f'dry run: would upload {sizes} to {where} with commit message "{message}"')
            log(f'export folder: {folder if export_dir else "temporary (pass --export-dir to keep it)"}; '
                f'Hugging Face token: {"found" if has_token else "NOT found (set HF_TOKEN or run `hf auth login`)"}')
            return None
        from huggingface_hub import HfApi
        from .. import __version__
        try:
            api = HfApi(library_name='timm_mimo', library_version=__version__)
            repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
            if revision and revision != 'main':
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                                       revision=revision, commit_message=message)
        except Exception as e:  # noqa: BLE001  (HTTP, connection, permission: one line, token removed)
            raise HubError(redact(f'upload to {where} failed, {http_one_line(e)}')) from e
        url = getattr(commit, 'commit_url', None) or str(commit)
        log(f'uploaded {sizes} to {where}: {url}')
        return url


