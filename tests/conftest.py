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
def platform_env(request, tmp_path_factory) -> dict:
    early = request.config.stash.get(EARLY, None)
    return early["env"] if early else _platform_env(tmp_path_factory.mktemp("platform"))


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
EARLY = pytest.StashKey[dict]()


def _start(name: str, env: dict) -> subprocess.CompletedProcess:
    return _run(SERVICES[name][0], "start", env, SERVICES[name][1])


def _stop_services(started: dict, env: dict, pool: ThreadPoolExecutor) -> None:
    """Stop the started services side by side (each stop waits for its processes to exit), never one whose
    start still runs."""
    def stop(name):
        with contextlib.suppress(Exception):
            started[name].result()
        _run(SERVICES[name][0], "stop", env, SERVICES[name][2])

    for future in [pool.submit(stop, name) for name in started]:
        with contextlib.suppress(Exception):
            future.result()
    pool.shutdown()


def _whole_suite(config) -> bool:
    """`make test`: pytest with its test paths and no selection, so every module runs and needs both services
    and the platform chain."""
    o = config.option
    return (config.args_source is pytest.Config.ArgsSource.TESTPATHS and not o.collectonly and not o.keyword
            and not o.markexpr and not o.deselect and not getattr(o, "lf", False))


def pytest_sessionstart(session):
    """For the whole suite, the Ray head, the MLflow server and the chain start before collection: collecting
    30 modules keeps one core busy for 10–16 s (on a clean clone Python compiles torch's, Ray's and MLflow's
    bytecode then), and the services' starts mostly wait. The session fixtures below take them over and stop
    them; ``pytest_sessionfinish`` stops them if no fixture ever did (a collection error, say)."""
    config = session.config
    if not _whole_suite(config):
        return
    factory = config._tmp_path_factory  # what the tmp_path_factory fixture returns
    env = _platform_env(factory.mktemp("platform"))
    pool = ThreadPoolExecutor(2, thread_name_prefix="service")
    early = {"env": env, "pool": pool, "owned": False,
             "services": {name: pool.submit(_start, name, env) for name in SERVICES}}
    early["chain"] = _start_chain(env, early["services"], factory)
    config.stash[EARLY] = early


def pytest_sessionfinish(session):
    early = session.config.stash.get(EARLY, None)
    if early and not early["owned"]:
        _stop_services(early["services"], early["env"], early["pool"])
        early["chain"]["pool"].shutdown(wait=True)


@pytest.fixture(scope="session")
def _services(request, platform_env):
    """The Ray head and the MLflow server that the selected tests need, started side by side in the background
    (before collection for the whole suite, else when the first test starts: each start mostly waits, and the
    first tests need neither and run meanwhile), and stopped again, side by side, at the end of the session,
    also when tests fail. Returns name → Future of the start."""
    early = request.config.stash.get(EARLY, None)
    if early:  # the whole suite: started by pytest_sessionstart
        pool, started = early["pool"], early["services"]
        early["owned"] = True
    else:
        pool = ThreadPoolExecutor(2, thread_name_prefix="service")
        names = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
        if any(_chain_rank(item) for item in request.session.items):
            names |= set(SERVICES)  # the chain asks for both by name, at run time
        wanted = [name for name in SERVICES if name in names]
        started = {name: pool.submit(_start, name, platform_env) for name in wanted}

    try:
        yield started
    finally:
        _stop_services(started, platform_env, pool)


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
    """The platform chain (tests/chain.py) in a thread, started before collection for the whole suite, else at
    the first test when any selected test reads it; ``champion`` and ``jobs_done`` wait for their part of it."""
    early = request.config.stash.get(EARLY, None)
    if not early and not any(_chain_rank(item) for item in request.session.items):
        yield None
        return
    services = request.getfixturevalue("_services")  # started in the background; the chain waits for them
    chain = early["chain"] if early else _start_chain(request.getfixturevalue("platform_env"), services,
                                                      tmp_path_factory)
    try:
        yield chain
    finally:
        chain["pool"].shutdown(wait=True)  # never stop the Ray head under a running job


def _start_chain(env: dict, services: dict, tmp_path_factory) -> dict:
    """tests/chain.py in a thread: it writes its archives, waits for the services and runs its jobs;
    ``champion`` and ``nightly`` are set halfway, ``done`` at the end."""
    from chain import run_chain

    def services_up():
        for name in SERVICES:
            _wait_started(name, services)

    pool = ThreadPoolExecutor(1, thread_name_prefix="chain")
    champion, nightly = Future(), Future()
    done = pool.submit(run_chain, env, tmp_path_factory.mktemp("chain"), champion, nightly, services_up)
    return {"champion": champion, "nightly": nightly, "done": done, "pool": pool}


@pytest.fixture(scope="session")
def champion(_chain_in_background):
    """The chain's CT-3DFlow champion, registered with its voxel-map operating point (tests/chain.py): its
    ``model_file`` and ``registered_model``. Ready once the chain's first train and tune jobs are done."""
    return _chain_in_background["champion"].result()


@pytest.fixture(scope="session")
def nightly(_chain_in_background):
    """The chain's nightly screening with the CT-3DFlow champion over tonight's (hostile) archive
    (tests/chain.py, tests/tonight_archive.py), stopped mid-run and resumed. Ready once its second job is done."""
    return _chain_in_background["nightly"].result()


@pytest.fixture(scope="session")
def jobs_done(_chain_in_background):
    """The platform's chain with `ray job submit`, once per session (tests/chain.py): CT-3DFlow on the
    anatomy-density map (train, stopped and then resumed → tune → the nightly screening → evaluate) and the AE on
    the paper's patch map (train → tune → evaluate)."""
    return _chain_in_background["done"].result()
