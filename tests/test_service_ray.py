"""``bindsearch serve --engine ray``: the real server, its shards and encoder on a local Ray.

One Ray instance for the module (4 logical CPUs); the servers join it with ``--ray-address``.
The same index (the tiny random model over a small mixed corpus, Flat, calibrated, tagged) is
served by the single-process service and by ``--engine ray --shards 2``: the same requests get
the same ids, scores and relevance; a killed shard replica gives 503s or right answers, never a
wrong one, until Ray Serve has restarted it; auth, errors and /metrics are the service's.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from bindsearch.cli import app as cli_app
from encoders.config import resolve_config
from index import BuildOptions, ModelSource, build_index

from .test_index_media import audio, image
from .test_service_e2e import CONFIG, KEY, REPO, Server, _start, _stop
from .test_service_live_index import until

AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = {"BINDSEARCH_API_KEY": KEY, "BINDSEARCH_TORCH_THREADS": "1"}
RAY_CPUS = 4  # logical: 2 shards + 1 encoder replica, 1 CPU each
# Ray Serve's own schema module, as it is imported (Ray 2.60 with pydantic 2.14).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using extra keyword arguments on `Field`:pydantic.warnings.PydanticDeprecatedSince20"
)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images (some tagged), sounds and captions: three modalities, calibrated, Flat."""
    root = tmp_path_factory.mktemp("ray-corpus")
    rows = []
    for i in range(10):
        image(root / f"img{i}.png", seed=i)
        rows.append({"path": f"img{i}.png", "tags": ["red"] if i % 3 == 0 else ["blue"]})
    for i in range(4):
        audio(root / f"snd{i}.wav", seed=100 + i, seconds=1.0)
        rows.append({"path": f"snd{i}.wav", "tags": ["red"] if i % 2 else []})
    for i, text in enumerate(["a red square", "a blue circle", "a dog barking", "rain"]):
        (root / f"cap{i}.txt").write_text(text)
        rows.append({"path": f"cap{i}.txt", "tags": ["red"] if "red" in text else []})
    manifest = root / "corpus.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("ray-index") / "idx"
    # in this process (seeded random weights, as `serve --random-weights`): no CLI start-up
    build_index(manifest, out, ModelSource(resolve_config(CONFIG), None), BuildOptions(workers=0))
    return out


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, index_dir: Path, ray_address: str
) -> Iterator[tuple[Server, Server]]:
    """(single-process, ``--engine ray --shards 2``) over the same index."""
    tmp = tmp_path_factory.mktemp("ray-servers")
    args = ["--index", str(index_dir)]
    ray_args = [*args, "--engine", "ray", "--shards", "2", "--ray-address", ray_address]
    # Both start at once (most of a start is importing torch and, for ray, the replicas').
    with ThreadPoolExecutor(2) as pool:
        starts = [
            pool.submit(_start, tmp, args, ENV),
            pool.submit(_start, tmp, ray_args, ENV, log_level="info"),
        ]
    started = [f.result() for f in starts if f.exception() is None]
    try:
        for f in starts:
            f.result()  # a start that failed: its error, after stopping the other
        (local, _), (sharded, _) = started
        yield local, sharded
    finally:
        for _, p in started:
            _stop(p)
    # A server that joined a cluster leaves it running, without its Ray Serve applications.
    from ray import serve

    assert not [a for a in serve.status().applications if a.startswith("bindsearch-")]


def search(server: Server, body: dict[str, Any], headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/search", json=body, headers=headers, timeout=60)


def hits(r: httpx.Response) -> list[tuple[int, float, float | None]]:
    assert r.status_code == 200, r.text
    return [(h["id"], h["score"], h["relevance"]) for h in r.json()["results"]]


def _item_ids(server: Server) -> dict[str, int]:
    r = search(server, {"text": "anything", "k": 100})
    return {Path(h["path"]).name: h["id"] for h in r.json()["results"]}


def test_sharded_service_gives_the_single_process_answers(servers: tuple[Server, Server]) -> None:
    local, sharded = servers
    ids = _item_ids(local)
    assert len(ids) == 18  # every item, through one search: both servers hold them all
    img, snd = ids["img4.png"], ids["snd1.wav"]
    vector = [0.3, -0.1] + [0.05] * 14  # the tiny model's 16-d space
    bodies: list[dict[str, Any]] = [
        {"text": "a red square"},
        {"text": "a red square", "k": 5, "merge": "raw"},
        {"text": "a red square", "k": 3, "merge": "rrf"},
        {"text": "a red square", "k": 2, "merge": "per_modality"},
        {"text": "rain", "target": ["vision", "audio"], "k": 7},
        {"vector": vector, "k": 8},
        {"item_id": img, "k": 6},
        {"item_id": snd, "merge": "per_modality", "k": 3},
        {"text": "a red square", "tags": ["red"], "k": 10},
        {"item_id": img, "tags": ["blue"], "target": "vision", "k": 4},
        {"terms": [{"text": "a dog", "weight": 0.7}, {"item_id": snd, "weight": 0.3}], "k": 9},
        {"text": "nothing carries it", "tags": ["green"]},
    ]
    for body in bodies:
        one, many = search(local, body), search(sharded, body)
        # a calibrated index served by the model that built it: no note, from either
        assert one.json()["calibration_note"] is many.json()["calibration_note"] is None, body
        want, got = hits(one), hits(many)
        assert [h[0] for h in got] == [h[0] for h in want], body
        for (_, s1, r1), (_, s2, r2) in zip(want, got, strict=True):
            assert abs(s1 - s2) <= 1e-5, body
            assert (r1 is None) == (r2 is None) and abs((r1 or 0) - (r2 or 0)) <= 1e-5, body
    # the index is calibrated: relevance is not the raw score, so it was compared above
    calibrated = hits(search(local, {"text": "a red square"}))
    assert any(abs(s - (r or s)) > 1e-3 for _, s, r in calibrated)
    info = httpx.get(f"{sharded.url}/v1/info", headers=AUTH, timeout=30).json()
    assert info["indexes"] == httpx.get(f"{local.url}/v1/info", headers=AUTH).json()["indexes"]
    assert info["calibration_note"] is None


class _Shard:
    """A shard deployment's handle, in this process: ``run_search.remote(...).result()``."""

    def __init__(self, root: Path, shard: int, shards: int) -> None:
        from index.shard import IndexShard

        self._shard = IndexShard.load(root, shard, shards)
        self.run_search = self

    def remote(self, q: Any, plan: Any) -> Any:
        return SimpleNamespace(result=lambda timeout_s: self._shard.run_search(q, plan))


def test_the_router_says_when_the_index_has_no_calibration(index_dir: Path, tmp_path: Path) -> None:
    """The sharded router holds the calibration: its /v1/search and /v1/info say when the
    index has none (built by an older bindsearch), as the single-process service does."""
    from fastapi.testclient import TestClient

    from index.search import open_index
    from service import FakeEmbedder, ServiceSettings, create_app
    from service.ray_serve import ShardedSearcher

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    manifest = json.loads((idx / "manifest.json").read_text())
    del manifest["calibration"]  # as an index built before calibration existed
    (idx / "manifest.json").write_text(json.dumps(manifest))
    snapshot = open_index(idx, snapshot=True, vectors=False)
    router = ShardedSearcher(snapshot, [_Shard(idx, s, 2) for s in range(2)], [])
    app = create_app(ServiceSettings(), FakeEmbedder(snapshot.dim), router)
    with TestClient(app) as c:
        until(lambda: c.get("/readyz").status_code == 200, "ready", 60)
        r = c.post("/v1/search", json={"text": "a red square", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
        note = r.json()["calibration_note"]
        assert note is not None and "has no calibration" in note, note
        assert "`bindsearch index sync`" in note and str(idx) in note, note
        r = c.post("/v1/search", json={"text": "a red square", "merge": "rrf"})
        assert r.status_code == 200 and r.json()["calibration_note"] is None, r.text
        assert c.get("/v1/info").json()["calibration_note"] == note
    router.close()


def test_auth_errors_and_metrics_are_the_services(servers: tuple[Server, Server]) -> None:
    local, sharded = servers
    cases: list[tuple[dict[str, Any], dict[str, str], int]] = [
        ({"text": "a red square"}, {}, 401),
        ({"text": "a red square"}, {"Authorization": "Bearer wrong"}, 401),
        ({"text": "a red square", "k": 0}, AUTH, 400),
        ({"text": "x", "item_id": 1}, AUTH, 400),
        ({"item_id": 10_000}, AUTH, 404),
        ({"data": "bm90IGFuIGltYWdl", "modality": "vision"}, AUTH, 422),
        ({"vector": [1.0, 2.0]}, AUTH, 422),
    ]
    for body, headers, status in cases:
        want, got = search(local, body, headers), search(sharded, body, headers)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), body
        assert got.status_code == status, (body, got.text)
    metrics = httpx.get(f"{sharded.url}/metrics", timeout=30).text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("bindsearch_requests_total{")
        and 'route="/v1/search"' in x
        and 'status="401"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 2


def _shard_replica(ray: Any, shard: int) -> str:
    prefix = f"SERVE_REPLICA::bindsearch-shard-{shard}#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]
    assert len(names) == 1, names
    return str(names[0])


def test_losing_a_shard_replica_gives_503_or_right_answers(
    servers: tuple[Server, Server],
) -> None:
    import ray

    local, sharded = servers
    body = {"text": "a red square", "k": 12}
    want = [h[0] for h in hits(search(local, body))]
    seen: list[tuple[int, list[int] | None, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{sharded.url}/v1/search", json=body, headers=AUTH)
                ids = [h["id"] for h in r.json()["results"]] if r.status_code == 200 else None
                seen.append((r.status_code, ids, r.headers.get("retry-after")))

    old = _shard_replica(ray, 0)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        until(lambda: len(seen) >= 3, "searches before the kill", 60)
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        killed_at = len(seen)
        until(lambda: _replaced(ray, old), "a new replica of shard 0", 120)
        until(lambda: _ready(sharded), "/readyz after the restart", 120)
        n = len(seen)
        until(lambda: len(seen) >= n + 3, "searches after the restart", 60)
    finally:
        stop.set()
        thread.join(timeout=90)
    for status, ids, retry in seen:
        assert status in (200, 503), status
        if status == 200:
            assert ids == want  # never a partial merge
        else:
            assert retry is not None  # 503 says when to retry
    assert all(s == 200 for s, _, _ in seen[:killed_at])
    assert all(s == 200 for s, _, _ in seen[n:])


def _replaced(ray: Any, old: str) -> bool:
    try:
        return _shard_replica(ray, 0) != old
    except AssertionError:
        return False  # none (or the old one and its successor) registered right now


def _ready(server: Server) -> bool:
    return httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200


def test_without_ray_it_is_one_line_and_exit_1_as_index_build_says_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A missing Ray is an environment error, as for ``index build --engine ray``
    (``test_without_ray_the_engine_is_a_one_line_error``): exit 1; 2 is a usage error."""
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import ray.serve -> ImportError
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--engine", "ray", "--index", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: the ray engine needs Ray: pip install 'bindsearch[ray]'")


def test_bad_engine_and_counts_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for args, why in (
        (["--engine", "spark"], "accepted: local, ray"),
        (["--engine", "ray", "--shards", "0"], "--shards must be at least 1"),
        (["--engine", "ray", "--replicas", "0"], "--replicas must be at least 1"),
        (["--shards", "2"], "go with --engine ray"),
        (["--ray-address", "auto"], "go with --engine ray"),
    ):
        r = runner.invoke(cli_app, ["serve", "--index", str(tmp_path), *args])
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr


def test_an_index_that_is_not_there_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No Ray is started: the index is checked first (the module's Ray instance is not used).
    runner = CliRunner()
    args = ["serve", "--engine", "ray", "--random-weights", "--config", "imagebind_test"]
    r = runner.invoke(cli_app, [*args, "--index", str(tmp_path / "none")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no index at" in r.stderr and "does not wait" in r.stderr
    (tmp_path / "items.jsonl").write_text("{}\n")
    r = runner.invoke(cli_app, [*args, "--index", str(tmp_path / "items.jsonl")])
    assert r.exit_code == 1 and "serves an index directory" in r.stderr, r.stderr


def test_the_kuberay_example_is_yaml_and_uses_real_serve_flags() -> None:
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((REPO / "docs" / "kuberay-serve.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["RayCluster", "Service"]
    head = docs[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    command = head["args"][0].split("bindsearch serve", 1)[1]
    flags = set(re.findall(r"(--[a-z][a-z-]*)", command))
    assert {"--engine", "--shards", "--replicas", "--ray-address"} <= flags
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"], terminal_width=200).stdout
    assert all(f in help_text for f in flags), flags


def test_an_unavailable_encoder_replica_is_503_with_retry_after() -> None:
    # What RayEmbedder raises when its replica died or timed out, through the service's batcher.
    from fastapi.testclient import TestClient

    from service import FakeEmbedder, ServiceSettings, create_app
    from service.ray_serve import RayUnreachable

    class Gone(FakeEmbedder):
        def embed(self, modality: Any, batch: Any) -> Any:
            raise RayUnreachable("an encoder replica is unavailable (ActorDiedError)", 2)

    with TestClient(create_app(ServiceSettings(), Gone())) as client:
        until(lambda: client.get("/readyz").status_code == 200, "ready", 60)
        r = client.post("/v1/embed", json={"text": "a red square"})
    assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
    assert r.json()["error"]["message"].startswith("an encoder replica is unavailable")
