"""What every command line of the project shares: one error trap, ``K=V`` model arguments, token redaction.

Bad input, a missing file, a full or read-only disk, a refused download: one ``error:`` line on stderr and exit
code 2, never a traceback (``--debug`` prints it, with any Hugging Face token removed).
"""
import re
import sys
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Type

# what a user can cause and mend: bad values, missing or unreadable files, a full or read-only disk
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, OSError)


def hf_token() -> Optional[str]:
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:  # noqa: BLE001  (an unusable login is no login; its error may quote the token)
        return None


def redact(text) -> str:
    """``text`` without the Hugging Face token (the current one, and anything shaped like one)."""
    text, token = str(text), hf_token()
    if token:
        text = text.replace(token, '***')
    return re.sub(r'hf_[A-Za-z0-9]{20,}', '***', text)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return ' '.join(lines[:1]) or type(err).__name__


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            failures: Optional[Dict[Type[BaseException], int]] = None,
            debug: Optional[Callable[[List[str]], bool]] = None) -> int:
    """Run ``main(argv)``; ``failures`` maps further exception types to their exit codes (default 2). ``debug``
    says from the arguments whether the traceback is wanted (e.g. a config's ``debug: true``); without it, a
    ``--debug`` among them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    codes = {**{e: 2 for e in USER_ERRORS}, **(failures or {})}
    try:
        code = main(argv)
        return code if isinstance(code, int) else 0  # a main may return its results to callers
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except tuple(codes) as err:
        wants_traceback = debug(argv) if debug is not None else '--debug' in argv
        if wants_traceback:
            print(redact(traceback.format_exc()), file=sys.stderr)
        else:
            print(f'error: {redact(one_line(err))}', file=sys.stderr)
        return next(code for kind, code in reversed(list(codes.items())) if isinstance(err, kind))


def parse_model_kwargs(items, flag: str = '--model-kwargs') -> dict:
    """``['k=v', ...]`` from the command line (``flag``: --model-kwargs, --opt-kwargs) into keyword arguments
    (values parsed as YAML)."""
    import yaml
    kwargs = {}
    for item in items:
        if '=' not in item:
            raise ValueError(f'{flag} expects K=V, got {item!r}')
        key, value = item.split('=', 1)
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:  # a tag such as !!python/object is refused by safe_load: say so in one line
            reason = getattr(e, 'problem', None) or one_line(e)
            raise ValueError(f'{flag} {key}: not a plain YAML value ({reason})') from None
    return kwargs


def refuse_below_one(values: Mapping[str, Any], keys: Sequence[str]):
    """A ValueError naming the flag of the first of ``keys`` (argparse names) that is set and below 1 in
    ``values`` (the arguments by name)."""
    for key in keys:
        value = values[key]
        if value is not None and value < 1:
            raise ValueError(f'--{key.replace("_", "-")} must be >= 1, got {value}')


def usable_device(name: str):
    """``torch.device(name)`` once a tensor can be made there; else a ValueError naming the flag (no such
    device type, no driver or build for it, an index past the devices)."""
    import torch
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch's "Expected one of cpu, cuda, ...", "no NVIDIA driver"
        raise ValueError(f'--device {name} is not usable here: {one_line(e)}') from None
    return device


def http_one_line(err: BaseException) -> str:
    """An exception as one line; for an HTTP error, its status and what the server said."""
    status = getattr(getattr(err, 'response', None), 'status_code', None)
    server = ' '.join(str(getattr(err, 'server_message', None) or '').split())
    if status is not None and server:
        return f'HTTP {status}: {server}'
    return f'{type(err).__name__}: {one_line(err)}'
