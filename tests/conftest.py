"""Shared fixtures: a real local Ray head and a real MLflow server, started once per test session by the
project's own platform scripts (bound to 127.0.0.1) and stopped again, also when tests fail."""

from __future__ import annotations

import contextlib
import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# before any test module loads torch: importing the package sets OMP_WAIT_POLICY (libgomp reads it when torch
# loads), which the session's subprocesses and Ray head inherit; the Ray jobs share the 2 cores with the tests
import ct3dflow  # noqa: E402, F401
from ct3dflow.adapters.small_node import SMALL_NODE_ENV  # noqa: E402

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
    # the test head's own housekeeping, which a 2-core runner pays for beside every test (docs/BENCHMARKS.md)
    env.update(SMALL_NODE_ENV)
    return env


@pytest.fixture(scope="session")
def platform_env(tmp_path_factory) -> dict:
    return _platform_env(tmp_path_factory.mktemp("platform"))


def _run(script: str, action: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PLATFORM / script), action], env=env, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def _service(script: str, start_timeout: int, stop_timeout: int, env: dict):
    """Start a platform service with its own script and stop it again, also when a test fails."""
    r = _run(script, "start", env, start_timeout)
    try:
        if r.returncode != 0:
            pytest.fail(f"could not start {script}:\n{r.stdout}\n{r.stderr}")
        yield
    finally:
        _run(script, "stop", env, stop_timeout)


SERVICES = {"ray_head": ("ray-head.sh", 240, 120), "mlflow_server": ("mlflow-server.sh", 300, 60)}


@pytest.fixture(scope="session")
def _services(request, platform_env):
    """The Ray head and the MLflow server that the selected tests need, started side by side in the background
    when the session starts (each start mostly waits; the first tests need neither and run meanwhile), and
    stopped again, side by side, at the end of the session, also when tests fail. Returns name → Future of the
    start."""
    names = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    if any(_chain_rank(item) for item in request.session.items):
        names |= set(SERVICES)  # the chain asks for both by name, at run time
    wanted = [name for name in SERVICES if name in names]
    pool = ThreadPoolExecutor(2, thread_name_prefix="service")
    started = {name: pool.submit(_run, SERVICES[name][0], "start", platform_env, SERVICES[name][1]) for name in wanted}

    def stop(name):
        with contextlib.suppress(Exception):
            started[name].result()  # never stop a service while its start still runs
        _run(SERVICES[name][0], "stop", platform_env, SERVICES[name][2])

    try:
        yield started
    finally:
        for future in [pool.submit(stop, name) for name in started]:  # side by side: each waits for its exit
            with contextlib.suppress(Exception):
                future.result()
        pool.shutdown()


def _wait_started(name: str, started: dict) -> None:
    """Wait for a service started by ``_services``; a start that failed fails the caller with its output."""
    r = started[name].result()
    if r.returncode != 0:
        raise RuntimeError(f"could not start {SERVICES[name][0]}:\n{r.stdout}\n{r.stderr}")


@pytest.fixture(scope="session")
def ray_head(platform_env, _services):
    if "ray_head" in _services:
        _wait_started("ray_head", _services)
        yield platform_env
        return
    with _service(*SERVICES["ray_head"], platform_env):  # asked for at run time only
        yield platform_env


@pytest.fixture(scope="session")
def mlflow_server(platform_env, _services):
    if "mlflow_server" in _services:
        _wait_started("mlflow_server", _services)
        yield platform_env["MLFLOW_TRACKING_URI"]
        return
    with _service(*SERVICES["mlflow_server"], platform_env):
        yield platform_env["MLFLOW_TRACKING_URI"]


def _chain_rank(item) -> int:
    """0: needs nothing of the chain; 1: only its CT-3DFlow champion or nightly screening (ready halfway);
    2: the whole chain."""
    names = getattr(item, "fixturenames", ())
    return 2 if "jobs_done" in names else 1 if {"champion", "nightly"} & set(names) else 0


def pytest_collection_modifyitems(session, config, items):
    """Modules that read the platform chain run last (whole modules, so module fixtures are set up once): the
    chain's Ray jobs run in the background while the rest of the suite uses the other core. Those that need
    only its champion come before those that need the whole chain: they run beside the chain's second half."""
    rank: dict[str, int] = {}
    for item in items:
        rank[item.module.__name__] = max(rank.get(item.module.__name__, 0), _chain_rank(item))
    items.sort(key=lambda item: rank[item.module.__name__])  # stable: each group keeps its order


@pytest.fixture(scope="session", autouse=True)
def _chain_in_background(request, tmp_path_factory):
    """Starts the platform chain (tests/chain.py) in a thread at the start of the session when any selected
    test reads it; ``champion`` and ``jobs_done`` wait for their part of it."""
    if not any(_chain_rank(item) for item in request.session.items):
        yield None
        return
    from chain import run_chain

    services = request.getfixturevalue("_services")  # started in the background; the chain waits for them
    env = request.getfixturevalue("platform_env")
    pool = ThreadPoolExecutor(1, thread_name_prefix="chain")
    champion, nightly = Future(), Future()

    def services_up():
        for name in SERVICES:
            _wait_started(name, services)

    future = pool.submit(run_chain, env, tmp_path_factory.mktemp("chain"), champion, nightly, services_up)
    try:
        yield {"champion": champion, "nightly": nightly, "done": future}
    finally:
        pool.shutdown(wait=True)  # never stop the Ray head under a running job


@pytest.fixture(scope="session")
def champion(_chain_in_background):
    """The chain's CT-3DFlow champion, registered with its voxel-map operating point (tests/chain.py): its
    ``model_file`` and ``registered_model``. Ready once the chain's first train and tune jobs are done."""
    return _chain_in_background["champion"].result()


@pytest.fixture(scope="session")
def nightly(_chain_in_background):
    """The chain's nightly screening with the CT-3DFlow champion over tonight's (hostile) archive
    (tests/chain.py, tests/tonight_archive.py). Ready once the champion's screening job is done."""
    return _chain_in_background["nightly"].result()


@pytest.fixture(scope="session")
def jobs_done(_chain_in_background):
    """The platform's chain with `ray job submit`, once per session (tests/chain.py): CT-3DFlow on the voxel map
    (train, stopped and then resumed → tune → the nightly screening → evaluate) and the AE on the paper's patch
    map (train → tune → evaluate)."""
    return _chain_in_background["done"].result()
