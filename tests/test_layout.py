"""The package's layout: its modules import each other without a cycle."""
import ast
from pathlib import Path

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
