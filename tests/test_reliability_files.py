"""Files written, copied, uploaded and read back, tried as a hostile user would (issue "Trust, third pass"):
only regular files are written over (never a link, a device or a pipe), only regular files inside a folder are
copied or uploaded from it, a model card shows what it read from files and folder names as text (no HTML, no
extra front-matter keys), a killed export leaves nothing the next one keeps, and hand-edited files read back
are one `error:` line naming the file and field. docs/reliability.md lists each case."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from markdown_it import MarkdownIt

from test_hub import REPO, assert_one_line_error, make_run, run_cli
from test_report import load_validate

from timm_mimo import hub
from timm_mimo import rundir
from timm_mimo.cli import run_cli as run_trapped
from timm_mimo.eval.report import code_block, code_span, markdown_text

pytestmark = pytest.mark.usefixtures('one_thread')
EVIL_HTML = '<img src=x onerror=alert(1)>'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """test_hub's train.py-like run folder (best/, a checkpoint, args.yaml, results.json)."""
    return make_run(tmp_path_factory.mktemp('runs'))


def _special_files(folder):
    """{kind: path} of names that are not regular files: a link to a file outside, a named pipe, a device
    (a character device like /dev/null; making one needs root, as the tests run)."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / 'secret.txt'
    secret.write_text('keep me')
    (folder / 'link').symlink_to(secret)
    os.mkfifo(folder / 'pipe')
    paths = dict(link=folder / 'link', pipe=folder / 'pipe', folder=folder / 'sub')
    (folder / 'sub').mkdir()
    if os.geteuid() == 0:
        os.mknod(folder / 'device', 0o600 | 0o020000, os.makedev(1, 3))  # S_IFCHR: /dev/null's numbers
        paths['device'] = folder / 'device'
    return paths


def _kinds(paths):
    return {name: (os.lstat(p).st_mode, os.path.realpath(p)) for name, p in paths.items()}


# ------------------------------------------------------------------------------------------------------
# writing: only regular files (folders, for a folder) are ever written over

def test_atomic_writes_never_replace_a_link_a_device_a_pipe_or_a_folder(tmp_path):
    paths = _special_files(tmp_path)
    before = _kinds(paths)
    for name, path in paths.items():
        with pytest.raises(FileExistsError, match='not a regular file: refusing to write over it'):
            rundir.write_atomic(path, 'new')
    assert _kinds(paths) == before and (tmp_path / 'secret.txt').read_text() == 'keep me'
    assert not [p for p in tmp_path.iterdir() if '.tmp' in p.name]
    rundir.write_atomic(tmp_path / 'secret.txt', 'replaced')  # a regular file is replaced as before
    assert (tmp_path / 'secret.txt').read_text() == 'replaced'
    # a folder is swapped in only over a folder: a link named like it is refused, its target kept
    (tmp_path / 'target').mkdir()
    (tmp_path / 'target' / 'keep').write_text('x')
    (tmp_path / 'best').symlink_to(tmp_path / 'target')
    with pytest.raises(FileExistsError, match='is a symbolic link, not a folder'):
        with rundir.atomic_dir(tmp_path / 'best') as tmp:
            (tmp / 'w').write_text('w')
    assert (tmp_path / 'best').is_symlink() and (tmp_path / 'target' / 'keep').exists()
    assert not [p for p in tmp_path.iterdir() if '.tmp' in p.name]


@pytest.mark.parametrize('flag', ['--results-file', '--results-csv', '--reliability-png', '--save-predictions'])
def test_validate_refuses_a_link_a_device_or_a_pipe_as_output_even_with_overwrite(run_dir, tmp_path, flag,
                                                                                  capsys):
    validate = load_validate()
    paths = _special_files(tmp_path / 'outputs')
    before = _kinds(paths)
    for name, path in paths.items():
        capsys.readouterr()
        code = run_trapped(validate.main, [str(run_dir / 'best'), '--dataset', '', '--data-dir', '', flag, str(path),
                                           '--overwrite'])
        err = capsys.readouterr().err
        assert_one_line_error(code, err, str(path), 'not a regular file')
    assert _kinds(paths) == before and (tmp_path / 'outputs' / 'secret.txt').read_text() == 'keep me'


# ------------------------------------------------------------------------------------------------------
# copying and uploading: regular files inside the folder only

def _report(folder):
    from timm_mimo.eval.metrics import classification_metrics
    from timm_mimo.eval.report import write_report
    from timm_mimo.eval.uncertainty import uncertainty_metrics
    torch.manual_seed(0)
    logits, members, labels = torch.randn(40, 10), torch.randn(40, 2, 10), torch.randint(0, 10, (40,))
    results = dict(model='wrn16_2_mixmo2', split='test', num_members=2,
                   test=classification_metrics(logits, labels, members))
    results['test'].update(uncertainty_metrics(logits, labels, members))
    write_report(folder, results, logits, members, labels)
    return folder


def test_export_copies_no_link_out_of_the_report_folder_and_push_uploads_none(run_dir, tmp_path, capsys):
    secret = tmp_path / 'shadow'
    secret.write_text('root:SECRET-HASH:19000')
    report = _report(tmp_path / 'report')
    out = tmp_path / 'export'
    (report / 'zz.png').symlink_to(secret)  # a picture, as the export would list and copy it
    code, _, err = run_cli('export', capsys, run_dir, out, '--report', report)
    assert_one_line_error(code, err, str(report / 'zz.png'), 'is not a regular file inside', 'refusing to copy it')
    (report / 'zz.png').unlink()
    (report / 'results.json').rename(tmp_path / 'results.json')
    (report / 'results.json').symlink_to(secret)  # the numbers of the card's section
    code, _, err = run_cli('export', capsys, run_dir, out, '--report', report)
    assert_one_line_error(code, err, str(report / 'results.json'), 'is not a regular file inside', 'refusing')
    (report / 'results.json').unlink()
    (tmp_path / 'results.json').rename(report / 'results.json')
    assert not out.exists() and not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]
    # a regular report is exported; a link put into the export folder afterwards is never uploaded
    code, _, _ = run_cli('export', capsys, run_dir, out, '--report', report)
    assert code == 0 and b'SECRET' not in b''.join(p.read_bytes() for p in out.rglob('*') if p.is_file())
    (out / 'report' / 'reliability.png').unlink()
    (out / 'report' / 'reliability.png').symlink_to(secret)
    with pytest.raises(ValueError, match='reliability.png is not a regular file inside .*: refusing to upload it'):
        hub.upload_files(out)
    code, _, err = run_cli('push', capsys, out, '--repo-id', 'me/x', '--as-is', '--dry-run')
    assert_one_line_error(code, err, 'reliability.png', 'refusing to upload it')


# ------------------------------------------------------------------------------------------------------
# the model card: values from files and folder names are text

def _rendered(card: str) -> str:
    """The card's Markdown as HTML, as a CommonMark renderer with tables (the Hub's kind) shows it."""
    return MarkdownIt('commonmark').enable('table').render(card.split('---\n', 2)[2])


def test_markdown_helpers_keep_any_value_literal():
    for value in (EVIL_HTML, '[click](javascript:alert(1))', 'a | b', 'x`y``z', 'line\n\n# heading', '``'):
        html = MarkdownIt('commonmark').render(f'text {markdown_text(value)} and {code_span(value)}')
        assert '<img' not in html and '<a ' not in html and '<h1>' not in html, (value, html)
        assert html.count('<code>') == 1, (value, html)
    block = MarkdownIt('commonmark').render(code_block('a: "x\n```\n' + EVIL_HTML + '"', 'yaml') + '\nafter')
    assert '<img' not in block and block.count('<pre>') == 1 and '<p>after</p>' in block


def test_model_card_front_matter_is_yaml_and_names_from_files_are_text(tmp_path):
    run = make_run(tmp_path)
    results = json.loads((run / 'results.json').read_text())
    results['dataset'] = f'image folder /data/{EVIL_HTML}: 45 train / 15 validation'  # a folder's name
    results['device'] = EVIL_HTML
    (run / 'results.json').write_text(json.dumps(results))
    args = yaml.safe_load((run / 'args.yaml').read_text())
    args['mix_mode'] = f'cut\n```\n{EVIL_HTML}'  # a recipe value that would close the card's yaml block
    (run / 'args.yaml').write_text(yaml.safe_dump(args))
    (run / 'resumes.yaml').write_text(yaml.safe_dump([{'from': f'checkpoint-0001`{EVIL_HTML}',
                                                       'changes': [f'lr: 0.1 -> `{EVIL_HTML}`']}]))
    config = json.loads((run / 'best' / 'config.json').read_text())
    license = 'mit\ntags: [evil]\nextra_gated_prompt: Give us your password'
    config['pretrained_cfg']['license'] = license
    (run / 'best' / 'config.json').write_text(json.dumps(config))
    hub.export(run, tmp_path / 'out')

    card = (tmp_path / 'out' / 'README.md').read_text()
    front = yaml.safe_load(card.split('---\n')[1])
    assert set(front) == {'datasets', 'library_name', 'license', 'pipeline_tag', 'tags'}
    assert front['license'] == license and 'evil' not in front['tags'] and front['library_name'] == 'timm'
    assert front['datasets'] == ['uoft-cs/cifar10'] and front['pipeline_tag'] == 'image-classification'
    html = _rendered(card)
    assert '<img' not in html and 'onerror=alert(1)' in html  # shown as text, never as a tag
    assert html.count('<pre>') == 3  # the recipe, the usage snippet, the citation: no block closed early
    assert html.count('<h1>') == 1 and '<h2>Results</h2>' in html and '<h2>License</h2>' in html


# ------------------------------------------------------------------------------------------------------
# a killed export

KILLED_EXPORT = '''
import os, signal, sys
from timm_mimo import hub
export_module = sys.modules['timm_mimo.hub.export']
export_module.check_round_trip = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-export
hub.export(sys.argv[1], sys.argv[2])
'''


def test_a_killed_export_leaves_a_temporary_folder_that_the_next_export_removes(run_dir, tmp_path, capsys):
    out = tmp_path / 'export'
    proc = subprocess.run([sys.executable, '-c', KILLED_EXPORT, str(run_dir), str(out)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith('.export.tmp-')]) == 1
    (tmp_path / '.other.tmp-x').mkdir()  # another name's temporary folder: not this export's to remove
    code, _, _ = run_cli('export', capsys, run_dir, out)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ['.other.tmp-x', 'export']


# ------------------------------------------------------------------------------------------------------
# hand-edited files read back: one line naming the file and field

def test_an_unreadable_published_list_does_not_stop_the_import():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', TIMM_MIMO_PUBLISHED='garbage')
    proc = subprocess.run([sys.executable, '-c', 'import timm, timm_mimo; print(timm.is_model("wrn16_2_mixmo2"))'],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == 'True', proc.stderr[-2000:]
    assert "TIMM_MIMO_PUBLISHED: 'garbage' is not an <arch>.<tag> name: ignored" in proc.stderr


@pytest.mark.parametrize('edit,needle', [
    (lambda c: c.update(architecture=[c['architecture']]), 'architecture is a list, not a model name'),
    (lambda c: c.update(model_args=[1, 2]), 'model_args is a list, not a mapping'),
    (lambda c: c.update(pretrained_cfg='cifar10'), 'pretrained_cfg is a str, not a mapping'),
    (lambda c: c['pretrained_cfg'].update(input_size=[3, -32, -32]), 'input_size [3, -32, -32] is not'),
])
def test_a_hand_edited_config_is_one_line_in_validate_and_export(run_dir, tmp_path, edit, needle, capsys):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    config = json.loads((run / 'best' / 'config.json').read_text())
    edit(config)
    (run / 'best' / 'config.json').write_text(json.dumps(config))
    code, _, err = run_cli('export', capsys, run, tmp_path / 'out')
    assert_one_line_error(code, err, str(run / 'best' / 'config.json'), needle)
    code = run_trapped(load_validate().main, [str(run), '--dataset', '', '--data-dir', ''])
    assert_one_line_error(code, capsys.readouterr().err, str(run / 'best' / 'config.json'), needle)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('text,needle', [
    ('- from: [unclosed\n', 'resumes.yaml is not valid YAML'),
    ('- {}\n', 'resumes.yaml: resume 1 is not {from: <checkpoint>, changes: [<flag change>, ...]}'),
    ('- from: checkpoint-0001\n  changes: 5\n', 'resume 1 is not'),
    ('from: checkpoint-0001\n', 'resumes.yaml is not a list of resumes'),
])
def test_a_damaged_resume_record_is_one_line_on_export(run_dir, tmp_path, text, needle, capsys):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    (run / 'resumes.yaml').write_text(text)
    code, _, err = run_cli('export', capsys, run, tmp_path / 'out')
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / 'out').exists()


def test_a_report_with_missing_metrics_shows_them_as_missing_and_a_damaged_one_is_one_line(run_dir, tmp_path,
                                                                                           capsys):
    report = _report(tmp_path / 'report')
    results = json.loads((report / 'results.json').read_text())
    del results['test']['top5'], results['test']['member_top1']
    (report / 'results.json').write_text(json.dumps(results))
    code, _, err = run_cli('export', capsys, run_dir, tmp_path / 'out', '--report', report)
    assert code == 0, err
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert f'| top-1 / top-5 (%) | {results["test"]["top1"]:.2f} / n/a |' in card
    assert '| member top-1 (%) | n/a |' in card
    for damaged in ([], dict(split='test', test=[1]), dict(split='test', test={}, ood=dict(scores=[]))):
        (report / 'results.json').write_text(json.dumps(damaged))
        code, _, err = run_cli('export', capsys, run_dir, tmp_path / 'out2', '--report', report)
        assert_one_line_error(code, err, str(report / 'results.json'))
    assert not (tmp_path / 'out2').exists()
