"""Shared fixtures: a real local Ray head and a real MLflow server, started once per test session by the
project's own platform scripts (bound to 127.0.0.1) and stopped again, also when tests fail."""

from __future__ import annotations

import contextlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# before anything loads torch (libgomp reads it then): the session's Ray jobs share the 2 cores with the tests,
# and spinning OpenMP threads would hold them (ct3dflow/__init__.py); its subprocesses and Ray head inherit it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"


def _platform_env(state: Path) -> dict:
    env = dict(os.environ)
    env.update(
        CT3DFLOW_STATE=str(state),
        RAY_HEAD_PORT="6391",
        RAY_DASHBOARD_PORT="8276",
        MLFLOW_PORT="5056",
        VENV_BIN=str(Path(os.sys.executable).parent),
    )
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    # what env.sh derives, so tests can use it directly
    env["RAY_ADDRESS"] = "http://127.0.0.1:8276"
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5056"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(state / "ray_auth_token")
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env['PATH']}"
    return env


@pytest.fixture(scope="session")
def platform_env(tmp_path_factory) -> dict:
    return _platform_env(tmp_path_factory.mktemp("platform"))


def _run(script: str, action: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PLATFORM / script), action], env=env, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def _service(script: str, env: dict, start_timeout: int, stop_timeout: int):
    """Start a platform service with its own script and stop it again, also when a test fails."""
    r = _run(script, "start", env, start_timeout)
    try:
        if r.returncode != 0:
            pytest.fail(f"could not start {script}:\n{r.stdout}\n{r.stderr}")
        yield
    finally:
        _run(script, "stop", env, stop_timeout)


@pytest.fixture(scope="session")
def ray_head(platform_env):
    with _service("ray-head.sh", platform_env, 240, 120):
        yield platform_env


@pytest.fixture(scope="session")
def mlflow_server(platform_env):
    with _service("mlflow-server.sh", platform_env, 300, 60):
        yield platform_env["MLFLOW_TRACKING_URI"]


def _reads_chain(item) -> bool:
    return "jobs_done" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """Modules that read the platform chain run last (whole modules, so module fixtures are set up once): the
    chain's Ray jobs run in the background while the rest of the suite uses the other core."""
    late = {item.module.__name__ for item in items if _reads_chain(item)}
    items.sort(key=lambda item: item.module.__name__ in late)  # stable: each group keeps its order


@pytest.fixture(scope="session", autouse=True)
def _chain_in_background(request, tmp_path_factory):
    """Starts the platform chain (tests/chain.py) in a thread at the start of the session when any selected
    test reads it; ``jobs_done`` waits for it."""
    if not any(_reads_chain(item) for item in request.session.items):
        yield None
        return
    from chain import run_chain

    env = request.getfixturevalue("ray_head")
    request.getfixturevalue("mlflow_server")
    pool = ThreadPoolExecutor(1, thread_name_prefix="chain")
    future = pool.submit(run_chain, env, tmp_path_factory.mktemp("chain"))
    try:
        yield future
    finally:
        pool.shutdown(wait=True)  # never stop the Ray head under a running job


@pytest.fixture(scope="session")
def jobs_done(_chain_in_background):
    """The platform's chain with `ray job submit`, once per session (tests/chain.py): train (stopped, then
    resumed) → tune → evaluate → screen, CT-3DFlow on the voxel map and the AE on the paper's patch map."""
    return _chain_in_background.result()
