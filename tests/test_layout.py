"""The package's layout: its modules import each other without a cycle, and its citations of the method
descriptions point into the repository (docs/methods/)."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_mimo'


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: Path, modules: set) -> set:
    """The package's modules that ``path`` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f'{base}.{alias.name}' for alias in node.names)  # `from . import rundir`: a module
    # importing a.b.c runs the __init__ of a.b first
    found |= {'.'.join(m.split('.')[:k]) for m in found for k in range(1, m.count('.') + 1)}
    return {m for m in found if m in modules and m != name}


def test_the_package_has_no_import_cycle():
    paths = sorted(PACKAGE.rglob('*.py'))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, modules) for p in paths}
    # importing a module runs its packages' __init__ first: a package importing its own module is not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(module, trail):
        state[module] = 'open'
        for dep in sorted(graph[module]):
            if state.get(dep) == 'open':
                cycles.append(' -> '.join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[module] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, 'import cycles:\n' + '\n'.join(cycles)


REPO = PACKAGE.parent
METHOD_DOCS = REPO / 'docs' / 'methods'
# the method descriptions that once lived outside the repository, by name; built here so this file names none
DESCRIPTION_NAMES = ('mixmo', 'mixvit', 'automix', 'timm-plugin', 'landscape', 'style')
OUTSIDE_FOLDER = 'shared' + '/spec'
NAMED_DESCRIPTION = re.compile(r'(?<![\w/.-])((?:[\w.-]+/)*(?:%s)\.md)' % '|'.join(map(re.escape, DESCRIPTION_NAMES)))
# "spec" followed by a section sign or a section number: a citation of a description it does not name
UNNAMED_CITATION = re.compile(r'\b[Ss]pec\b[\s`\'"(]*(?:§|\d+\.\d)')
METHOD_CITATION = re.compile(r'((?:\.\./)*docs/methods/([\w-]+)\.md)`?((?:[\s,/–-]|and|§|\d+(?:\.\d+)*)*)')
SECTION_HEADING = re.compile(r'^#{1,6}\s+§(\d+(?:\.\d+)*)(?![\d.]*\d)', re.M)


def tracked_text_files() -> list:
    """Every file git tracks (plus the method docs, tracked or not yet), as paths relative to the repository."""
    listed = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, text=True, check=True)
    paths = {p for p in listed.stdout.split('\0') if p}
    paths |= {p.relative_to(REPO).as_posix() for p in METHOD_DOCS.glob('*.md')}
    return sorted(p for p in paths if (REPO / p).is_file())


def section_headings(doc: Path) -> set:
    return set(SECTION_HEADING.findall(doc.read_text()))


@pytest.mark.parametrize('relative', tracked_text_files())
def test_citations_point_into_the_repository(relative):
    """No file cites the method descriptions outside the repository: every description it names is a file
    here, and every section it cites in docs/methods/ is a heading of that file."""
    path = REPO / relative
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
        return  # a binary file cites nothing
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f'{relative}:{number}'
        if OUTSIDE_FOLDER in line:
            problems.append(f'{where}: cites {OUTSIDE_FOLDER}, outside the repository')
        for named in NAMED_DESCRIPTION.findall(line):
            if not ((REPO / named).is_file() or (path.parent / named).is_file()):
                problems.append(f'{where}: names {named}, which is no file of the repository (docs/methods/?)')
        if UNNAMED_CITATION.search(line):
            problems.append(f'{where}: cites a section of an unnamed spec: {line.strip()}')
        for cited, name, sections in METHOD_CITATION.findall(line):
            doc = METHOD_DOCS / f'{name}.md'
            if not doc.is_file():
                problems.append(f'{where}: cites {cited}, which does not exist')
                continue
            if not sections.lstrip(' `').startswith('§'):
                continue  # the file as a whole
            headings = section_headings(doc)
            missing = [s for s in re.findall(r'\d+(?:\.\d+)*', sections) if s not in headings]
            if missing:
                problems.append(f'{where}: cites {cited} §{", §".join(missing)}, not a section heading there')
    assert not problems, '\n'.join(problems)
