"""The flags hub/export.py and hub/push.py share, and the keyword arguments of ``timm_mimo.hub.export`` they
become."""
from timm_mimo import rundir
from timm_mimo.hub import DEFAULT_LICENSE


def add_export_arguments(parser):
    """Flags shared by hub/export.py and hub/push.py."""
    parser.add_argument('source', help='training folder (train.py output), checkpoint or model folder, or weights file')
    parser.add_argument('--which', default='best', choices=[rundir.BEST_DIR, 'last', rundir.EMA_DIR],
                        help='weights of a training folder (default: best)')
    parser.add_argument('--model', default=None, help='architecture of a weights file; checked against a folder')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                        help='create_model arguments of a weights file\'s model, e.g. backbone=resnet50 '
                             'num_members=2 for mimo_backbone (a folder records its own)')
    parser.add_argument('--num-classes', type=int, default=None, help='expected class count (checked)')
    parser.add_argument('--results', default=None,
                        help='metrics file (train.py results.json or validate.py --results-file); default: the '
                             'run\'s results.json')
    parser.add_argument('--tag', default=None, help='pretrained tag, e.g. cifar100 (default: from the dataset)')
    parser.add_argument('--license', default=None, help=f'license of the weights (default: the model\'s, '
                                                        f'else {DEFAULT_LICENSE})')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty export folder')
    parser.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    parser.add_argument('--report', default=None,
                        help='a validate.py --report folder: its page becomes the card\'s evaluation section')


def export_options(args) -> dict:
    """The parsed flags as ``timm_mimo.hub.export``'s keyword arguments."""
    from timm_mimo.cli import parse_model_kwargs
    return dict(which=args.which, model_name=args.model, model_kwargs=parse_model_kwargs(args.model_kwargs),
                num_classes=args.num_classes, results=args.results,
                tag=args.tag, license=args.license, overwrite=args.overwrite, report=args.report)
