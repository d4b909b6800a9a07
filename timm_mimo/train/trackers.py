"""Experiment trackers through Accelerate (``--log-with``): TensorBoard, wandb and every other tracker
Accelerate knows, on the main process only (Accelerate's trackers log there alone).

What a resumed run needs to continue the same tracker run lives in the run folder, under ``trackers/``:
TensorBoard's log folder (``trackers/<project>/``), where the resumed process purges the events past its
checkpoint's step before it logs them again, so no step is logged twice; and wandb's run id
(``trackers/wandb-run-id``), resumed with ``resume='allow'``.
"""
import os
import secrets
from pathlib import Path
from typing import Tuple

from .. import rundir

WANDB_RUN_ID_FILE = 'wandb-run-id'


def tracker_names(spec: str) -> Tuple[str, ...]:
    """``'tensorboard,wandb'`` as Accelerate's tracker names, each known to Accelerate and installed ('all':
    every installed one; '' or 'none': none); a ValueError naming the first that is not."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    names = [name.strip() for name in spec.split(',') if name.strip()]
    installed = [str(t) for t in get_available_trackers()]
    if names in ([], ['none']):
        return ()
    if names == ['all']:
        return tuple(installed)
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f'unknown tracker {name!r} in --log-with: one of {", ".join(sorted(LOGGER_TYPE_TO_CLASS))}'
                             f' (Accelerate\'s), all or none')
        if name not in installed:
            raise ValueError(f'--log-with {name}: the {name} package is not installed (pip install {name})')
    return tuple(dict.fromkeys(names))


def tracker_config(arguments: dict) -> dict:
    """The run's arguments as a tracker config: scalars only (TensorBoard's hparams take nothing else), a list
    as its comma-joined values, a mapping as its ``k=v`` pairs, None as 'none'."""
    def scalar(value):
        if value is None:
            return 'none'
        if isinstance(value, (list, tuple)):
            return ','.join(map(str, value))
        if isinstance(value, dict):
            return ','.join(f'{k}={v}' for k, v in value.items())
        return value
    return {key: scalar(value) for key, value in arguments.items()}


def wandb_run_id(folder: Path, new_run: bool) -> str:
    """The run's wandb id: a new one for a new run, the stored one for a resumed run (a new one when none
    was stored: the run logged to wandb for the first time)."""
    path = folder / WANDB_RUN_ID_FILE
    if not new_run and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)  # wandb's ids: letters and digits
    rundir.write_atomic(path, run_id + '\n')
    return run_id


def start_trackers(accelerator, names: Tuple[str, ...], run_dir: Path, project: str, arguments: dict,
                   num_updates: int, new_run: bool):
    """Start the run's trackers (main process) with its arguments as their config; ``num_updates``: the
    optimizer steps done (0, or the resumed checkpoint's), whose events stay, every later one being purged."""
    if not names or not accelerator.is_main_process:
        return
    folder = run_dir / rundir.TRACKERS_DIR
    folder.mkdir(exist_ok=True)
    init_kwargs = {}
    if 'tensorboard' in names:  # events at or after purge_step, from a run interrupted past its checkpoint, go
        init_kwargs['tensorboard'] = dict(purge_step=num_updates + 1)
    if 'wandb' in names:  # its files in the run folder, unless WANDB_DIR says where
        init_kwargs['wandb'] = dict(id=wandb_run_id(folder, new_run), resume='allow', name=run_dir.name,
                                    **({} if os.environ.get('WANDB_DIR') else dict(dir=str(folder))))
    accelerator.init_trackers(project, config=tracker_config(arguments), init_kwargs=init_kwargs)
