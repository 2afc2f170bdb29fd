"""Project checks, as ordinary tests: the layering of imports, each module's public names
(`__all__`) and imports that keep to them, one status code and one client class per error
reason, a wheel that installs what the Dockerfile needs, and the check script itself. The
tools' checks (ruff, mypy, buf lint and breaking, stale stubs) are steps of `scripts/check`,
which runs them and then these tests."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.machinery
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from coffer.core import errors

from support.paths import root

# The folders that each hold a part of the namespace package `coffer`.
source_roots = ("core", "server", "bench", "clients")
subprocess_timeout_s = 120


def imports(package: str) -> Iterator[tuple[str, int, str]]:
    """(file, line, absolute module name) for every import in every module of `package`
    (such as `coffer.core`), relative imports resolved."""
    for path, line, module, _ in imported(package):
        yield path, line, module


def package_folder(package: str) -> Path:
    """The folder of `package` (a package under `coffer`), in whichever source root holds it."""
    [folder] = [
        root / source / Path(*package.split("."))
        for source in source_roots
        if (root / source / Path(*package.split("."))).is_dir()
    ]
    return folder


def imported(package: str) -> Iterator[tuple[str, int, str, tuple[str, ...]]]:
    """As `imports`, with the names each import takes from its module: a `from` import's,
    or ("*",) for a whole module (`import module`)."""
    base = package_folder(package)
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        package_of_module = ".".join((package, *relative.parent.parts))
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield str(path.relative_to(root)), node.lineno, alias.name, ("*",)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = package_of_module.split(".")
                    parent = parent[: len(parent) - node.level + 1]
                    module = ".".join([*parent, *([node.module] if node.module else [])])
                else:
                    assert node.module is not None
                    module = node.module
                names = tuple(alias.name for alias in node.names)
                yield str(path.relative_to(root)), node.lineno, module, names


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_core_imports_only_the_standard_library_and_asyncpg() -> None:
    found = list(imports("coffer.core"))
    assert found
    forbidden = ("grpc", "google.protobuf", "coffer.server", "coffer.clients")
    wrong = [
        f"{path}:{line}: {module}"
        for path, line, module in found
        if any(within(module, prefix) for prefix in forbidden)
        or not (
            module.split(".")[0] in sys.stdlib_module_names
            or within(module, "asyncpg")
            or within(module, "coffer.core")
        )
    ]
    assert not wrong, "core/ must import only the standard library and asyncpg:\n" + "\n".join(
        wrong
    )


def test_clients_import_neither_core_nor_server() -> None:
    found = [*imports("coffer.clients"), *imports("coffer.v1")]
    assert found
    server_side = ("coffer.core", "coffer.server", "coffer.postgres", "coffer.bench")
    wrong = [
        f"{path}:{line}: {module}"
        for path, line, module in found
        if any(within(module, prefix) for prefix in server_side)
    ]
    assert not wrong, "clients/ must import nothing of the server's distribution:\n" + "\n".join(
        wrong
    )


# What the server takes from the client's distribution beside the stubs (`coffer.v1`): the
# rule for callers, and two constants of the client's errors (the ErrorInfo domain, the replay
# metadata key) and the bound of a PEM file, so that both sides name them alike. None: any
# name. The benchmark, which drives a server with the typed client, is a package of its own.
server_imports_from_clients: dict[str, frozenset[str] | None] = {
    "coffer.clients.caller": None,
    "coffer.clients.errors": frozenset({"error_domain", "replayed_metadata_key"}),
    # Both sides read PEM files, bounded alike.
    "coffer.clients.tls": frozenset({"pem_bytes_max"}),
    # `coffer keys` and `coffer certificates` take the same options on the database as
    # through the server.
    "coffer.clients.cli": frozenset({"add_principal_options", "moment"}),
    # What a worker's health check says of it, which the client reads.
    "coffer.clients.workers": frozenset(
        {"Worker", "new_instance", "worker_metadata_key", "workers_max"}
    ),
}


def test_server_imports_from_clients_only_what_both_sides_share() -> None:
    wrong = []
    checked = 0
    for path, line, module, names in [*imported("coffer.server"), *imported("coffer.postgres")]:
        if not within(module, "coffer.clients"):
            continue
        for name in names:
            # `from coffer.clients import errors` takes a module whole.
            whole = module == "coffer.clients"
            target, taken = (f"{module}.{name}", "*") if whole else (module, name)
            allowed = [
                allowed_names
                for prefix, allowed_names in server_imports_from_clients.items()
                if within(target, prefix)
            ]
            checked += 1
            if not allowed or (allowed[0] is not None and taken not in allowed[0]):
                wrong.append(f"{path}:{line}: {target} {taken}")
    assert checked
    assert not wrong, (
        "the server may import from coffer.clients only coffer.clients.caller and the "
        "constants of coffer.clients.errors named in server_imports_from_clients:\n"
        + "\n".join(wrong)
    )


def test_the_caller_rule_is_defined_once() -> None:
    """`coffer.clients.caller` holds the rule for callers; the server imports it, and it
    imports only the standard library and the limits generated from the core's model (whose
    caller length it takes). The core's own caller, and the scopes of credentials, are ones
    no client may name."""
    from coffer.clients import caller
    from coffer.core import model

    found = [
        module
        for path, _, module in imports("coffer.clients")
        if path == "clients/coffer/clients/caller.py"
    ]
    assert found
    assert all(
        module.split(".")[0] in sys.stdlib_module_names or module == "coffer.clients.limits"
        for module in found
    ), found
    server_imports = {
        module
        for path, _, module in imports("coffer.server")
        if path == "server/coffer/server/gate.py"
    }
    assert "coffer.clients.caller" in server_imports
    assert model.caller_length_max == caller.caller_length_max
    assert model.system_caller.startswith(caller.caller_reserved_prefix)
    with pytest.raises(ValueError):
        caller.check_caller(model.system_caller)
    assert model.credential_scope_prefix == caller.caller_reserved_prefix


# Generated modules (the stubs in coffer.v1, the client's limits) start with this line; they
# are checked by `scripts/gen_protos.py --check` instead.
generated_header = "# Generated by scripts/gen_protos.py"
# The packages whose modules take from other modules of the project only what those export.
exporting_packages = ("coffer.core", "coffer.server", "coffer.postgres", "coffer.clients")


def source_modules() -> dict[str, Path]:
    """Every module of the source folders, generated ones too, by name (a package's is the
    package's own: `coffer.core`)."""
    found = {}
    for source in source_roots:
        for path in sorted((root / source / "coffer").rglob("*.py")):
            parts = path.relative_to(root / source).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def generated(path: Path) -> bool:
    return path.read_text().startswith(generated_header)


def defines_all(path: Path) -> bool:
    """Whether the module assigns `__all__` itself, at its top level."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            return True
    return False


def test_every_module_names_its_public_names() -> None:
    """Every module of the source folders but the generated ones defines `__all__`: names it
    has, each once, none of them private."""
    modules = {name: path for name, path in source_modules().items() if not generated(path)}
    assert "coffer.core.model" in modules and "coffer.clients.cli" in modules
    wrong = []
    for name, path in modules.items():
        where = path.relative_to(root)
        if not defines_all(path):
            wrong.append(f"{where}: no __all__")
            continue
        module = importlib.import_module(name)
        exported = module.__all__
        if not isinstance(exported, list) or not all(isinstance(each, str) for each in exported):
            wrong.append(f"{where}: __all__ is not a list of names")
            continue
        wrong.extend(
            f"{where}: {each} is not defined" for each in exported if not hasattr(module, each)
        )
        wrong.extend(f"{where}: {each} is private" for each in exported if each.startswith("_"))
        wrong.extend(
            f"{where}: {each} is listed twice"
            for each in sorted(set(exported))
            if exported.count(each) > 1
        )
    assert not wrong, "\n".join(wrong)


def test_modules_import_only_what_other_modules_export() -> None:
    """In the core, the server, coffer.postgres and the clients, `from module import name`
    from another module of the project takes a submodule, or a name that module exports: one
    in its `__all__` (or, from a generated module that has none, a public one)."""
    modules = source_modules()
    wrong = []
    checked = 0
    for package in exporting_packages:
        for path, line, module, names in imported(package):
            if module not in modules or names == ("*",):
                continue
            for name in names:
                if f"{module}.{name}" in modules:
                    continue
                checked += 1
                exported = getattr(importlib.import_module(module), "__all__", None)
                if name.startswith("_") or (exported is not None and name not in exported):
                    wrong.append(f"{path}:{line}: {module} {name}")
    assert checked
    assert not wrong, (
        "modules may import from other modules of the project only the names those export:\n"
        + "\n".join(wrong)
    )


def check_script() -> ModuleType:
    """scripts/check, loaded as a module (it has no .py suffix, to be run as a program)."""
    name = "coffer_check_script"
    loader = importlib.machinery.SourceFileLoader(name, str(root / "scripts" / "check"))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_check_script_runs_its_steps_in_order() -> None:
    check = check_script()
    steps = check.steps(["-k", "ledger"])
    assert [step.name for step in steps] == [
        "ruff check",
        "ruff format",
        "mypy",
        "buf lint",
        "buf breaking",
        "stubs fresh",
        "tests",
    ]
    missing = [f"{step.name}: {step.missing}" for step in steps if step.command is None]
    assert not missing, missing
    [breaking] = [step for step in steps if step.name == "buf breaking"]
    against = Path(breaking.command[breaking.command.index("--against") + 1])
    assert (root / against).is_file()
    assert against.parent == Path("protos", "releases")
    assert list(steps[-1].command[-2:]) == ["-k", "ledger"]


def test_check_script_runs_every_step_and_fails_if_any_failed(
    capfd: pytest.CaptureFixture[str],
) -> None:
    check = check_script()
    python = sys.executable
    steps = [
        check.Step("fails", [python, "-c", "raise SystemExit(3)"]),
        check.Step("cannot run", None, missing="no such tool"),
        check.Step("passes", [python, "-c", "print('ran after the failures')"]),
    ]
    assert check.run(steps, os.environ) == 1
    printed = capfd.readouterr().out
    assert "ran after the failures" in printed
    assert "no such tool" in printed
    for name in ("fails", "cannot run", "passes"):
        assert f"==> {name}\n" in printed
    assert printed.splitlines()[-1] == "check: 1 passed, 2 failed"
    assert check.run(steps[2:], os.environ) == 0
    assert capfd.readouterr().out.splitlines()[-1] == "check: 1 passed, 0 failed"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs the README's second command, the one that runs the checks, as written."""
    readme = (root / "README.md").read_text()
    commands = [block.strip() for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)]
    [command] = [command for command in commands if "scripts/check" in command]
    assert "\n" not in command
    ci = [
        line
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [command]


def test_every_reason_has_a_status_code() -> None:
    from coffer.server.errors import status_codes

    reasons = errors.reasons()
    assert reasons
    missing = [reason for reason, error in reasons.items() if error.category not in status_codes]
    assert not missing, missing


def test_every_reason_has_a_client_class() -> None:
    if importlib.util.find_spec("coffer.clients.errors") is None:
        pytest.skip("clients/errors.py is not written yet")
    from coffer.server.errors import status_codes

    client_errors = importlib.import_module("coffer.clients.errors")
    base = client_errors.CofferError
    classes = {
        value.reason: value
        for value in vars(client_errors).values()
        if isinstance(value, type) and issubclass(value, base) and value is not base
    }
    for reason, error in errors.reasons().items():
        client_class = classes.get(reason)
        assert client_class is not None, f"clients/errors.py has no class for {reason}"
        assert client_class.__name__ == error.__name__, (reason, client_class)
        assert client_class.code == status_codes[error.category], reason
        assert client_class.retryable == error.retryable, reason


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments)."""
    instructions = []
    pending = ""
    for line in (root / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        instruction, _, arguments = whole.partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def test_dockerfile_runs_coffer_as_a_user_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, arguments in instructions:
        by_name.setdefault(name, []).append(arguments)
    assert any("pip install" in arguments for arguments in by_name.get("RUN", []))
    users = by_name.get("USER", [])
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert by_name.get("HEALTHCHECK"), "no HEALTHCHECK"
    assert by_name.get("ENTRYPOINT") == ['["coffer"]']


def test_wheel_holds_the_migrations_stubs_and_console_script(tmp_path: Path) -> None:
    # The build context as the Dockerfile copies it, so that its COPY lines are checked too.
    source = tmp_path / "source"
    source.mkdir()
    for name, arguments in dockerfile_instructions():
        if name != "COPY":
            continue
        *sources, destination = shlex.split(arguments)
        for pattern in sources:
            for path in root.glob(pattern):
                target = source / destination
                if path.is_dir():
                    if destination.endswith("/") or destination == ".":
                        target = target / path.name
                    shutil.copytree(
                        path, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
    assert (source / "pyproject.toml").exists()
    assert (source / "clients" / "pyproject.toml").exists()
    dist = tmp_path / "dist"
    for project in (source, source / "clients"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(dist),
                ".",
            ],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=subprocess_timeout_s,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
    [server_wheel] = dist.glob("coffer-*.whl")
    [client_wheel] = dist.glob("coffer_client-*.whl")
    server_names, server_entry_points = wheel_contents(server_wheel)
    client_names, client_entry_points = wheel_contents(client_wheel)

    assert "coffer/core/migrations/0001_ledger.sql" in server_names
    for package in ("core", "server", "postgres", "bench"):
        assert f"coffer/{package}/__init__.py" in server_names, package
        assert f"coffer/{package}/py.typed" in server_names, package
    assert not [name for name in server_names if name.startswith(("coffer/clients", "coffer/v1"))]
    stubs = sorted(path.name for path in (root / "clients" / "coffer" / "v1").glob("*_pb2*.py*"))
    assert stubs
    missing = [stub for stub in stubs if f"coffer/v1/{stub}" not in client_names]
    assert not missing, missing
    assert {"coffer/clients/py.typed", "coffer/v1/py.typed"} <= client_names
    # The protos with their comments, which the server's reflection answers from.
    assert "coffer/v1/descriptors.binpb" in client_names
    assert not [
        name
        for name in client_names
        if name.startswith("coffer/") and not name.startswith(("coffer/clients/", "coffer/v1/"))
    ]
    assert client_entry_points["console_scripts"]["coffer"] == "coffer.clients.cli:main"
    assert "console_scripts" not in server_entry_points
    assert dict(server_entry_points["coffer.commands"]) == {
        "serve": "coffer.server.cli:serve",
        "migrate": "coffer.server.cli:migrate",
        "keys": "coffer.server.cli:keys",
        "certificates": "coffer.server.cli:certificates",
        "bench": "coffer.bench.main:main",
    }


def wheel_contents(wheel: Path) -> tuple[set[str], configparser.ConfigParser]:
    """A wheel's file names, and its entry points."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    return names, parser
