"""The web UI's pages over HTTP, against the real Postgres and Kafka: sign-in and session cookie,
roles and CSRF, every page rendered with data and empty, forms validated like the API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.auth.service import SERVER_ADMIN, create_token, revoke_token
from carrara.db import get_session
from carrara.models import (
    ApiToken,
    AuditEvent,
    Dataset,
    Deployment,
    DeploymentRevision,
    TrainingRun,
    VariantMetrics,
)
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS
from carrara.registry import service as registry
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from carrara.ui import templating
from carrara.ui.pages import (
    datasets,
    deployment_edit,
    deployments,
    feature_sets,
    models,
    run_detail,
    runs,
    signin,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
FEATURES = "amount: float\nitems: int\ncountry: category"


def token(session: Session, role: Role, name: str) -> str:
    """A committed token's secret (committed: a failed form rolls the request's work back)."""
    _, secret = create_token(session, name, role, created_by=None)
    session.commit()
    return secret


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page has no CSRF token"
    return match[1]


def sign_in(client: TestClient, secret: str) -> str:
    """Sign `client` in with `secret`; returns the session's (new) CSRF token."""
    page = client.get("/ui/sign-in")
    response = client.post(
        "/ui/sign-in",
        data={"csrf_token": csrf_of(page.text), "token": secret, "next": "/ui/datasets"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/datasets"
    return csrf_of(client.get("/ui/").text)


@pytest.fixture
def client(client: TestClient, db_session: Session) -> TestClient:
    """The app, each request committing its work as in production (a savepoint in the test's
    transaction, rolled back after the test): a failed form then undoes only its own request.
    """

    def _session() -> Iterator[Session]:
        yield db_session
        db_session.commit()

    client.app.dependency_overrides[get_session] = _session
    return client


@pytest.fixture
def editor(client: TestClient, db_session: Session) -> str:
    """`client` signed in as an editor; returns the CSRF token."""
    return sign_in(client, token(db_session, Role.editor, "ui-editor"))


def test_pages_redirect_to_sign_in_and_back(client: TestClient, db_session: Session) -> None:
    response = client.get("/ui/runs?status=failed", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/sign-in?next=%2Fui%2Fruns%3Fstatus%3Dfailed"
    # HTMX fragments ask HTMX to load the sign-in page instead of swapping it in.
    fragment = client.get("/ui/overview/live", headers={"HX-Request": "true"})
    assert fragment.status_code == 204
    assert fragment.headers["HX-Redirect"].startswith("/ui/sign-in?next=")
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_sign_in_keeps_only_who_in_a_signed_http_only_lax_cookie(
    client: TestClient, db_session: Session
) -> None:
    secret = token(db_session, Role.viewer, "ui-viewer")
    page = client.get("/ui/sign-in")
    wrong = client.post(
        "/ui/sign-in", data={"csrf_token": csrf_of(page.text), "token": "crr_nope", "next": ""}
    )
    assert wrong.status_code == 401
    assert "Sign-in failed: the bearer token is not valid" in wrong.text

    forged = client.post("/ui/sign-in", data={"csrf_token": "forged", "token": secret})
    assert forged.status_code == 403
    assert "This form has expired" in forged.text

    response = client.post(
        "/ui/sign-in",
        data={"csrf_token": csrf_of(page.text), "token": secret, "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"  # never an open redirect
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("carrara_ui=")
    for flag in ("httponly", "samesite=lax", "path=/ui"):
        assert flag in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http here; see the https test
    assert secret not in cookie
    assert secret[4:20] not in cookie
    home = client.get("/ui/")
    assert home.status_code == 200
    assert "ui-viewer" in home.text
    assert "role-viewer" in home.text
    # The API stays stateless: the cookie never authenticates it.
    assert client.get("/api/v1/datasets").status_code == 401


def test_the_cookie_is_secure_over_https(db_session: Session, client: TestClient) -> None:
    secret = token(db_session, Role.viewer, "ui-https")
    secure = TestClient(client.app, base_url="https://testserver")
    page = secure.get("/ui/sign-in")
    response = secure.post(
        "/ui/sign-in",
        data={"csrf_token": csrf_of(page.text), "token": secret},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert "secure" in response.headers["set-cookie"].lower()


def test_sign_out_and_revocation_end_the_session(client: TestClient, db_session: Session) -> None:
    secret = token(db_session, Role.editor, "ui-revoked")
    sign_in(client, secret)
    assert client.get("/ui/datasets").status_code == 200
    row = db_session.scalar(select(ApiToken).where(ApiToken.name == "ui-revoked"))
    revoke_token(db_session, row.id, SERVER_ADMIN)
    db_session.commit()
    response = client.get("/ui/datasets", follow_redirects=False)
    assert response.status_code == 303
    assert "revoked" in response.headers["location"]

    csrf = sign_in(client, token(db_session, Role.viewer, "ui-other"))
    out = client.post("/ui/sign-out", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.headers["location"] == "/ui/sign-in"
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_empty_states_render_for_a_fresh_platform(client: TestClient, editor: str) -> None:
    expectations = {
        "/ui/": "Live deployments",
        "/ui/datasets?prefix=zz-none": "No dataset matches",
        "/ui/runs?dataset=zz-none": "No run matches these filters",
        "/ui/models?prefix=zz-none": "No model matches",
        "/ui/deployments?status=stopped": "Deployments",
        "/ui/datasets/_new": "Register dataset",
        "/ui/deployments/_new": "Review change",
    }
    for path, text in expectations.items():
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[-2000:])
        assert text in response.text, path
    missing = client.get("/ui/datasets/no-such-dataset")
    assert missing.status_code == 404
    assert "dataset &#39;no-such-dataset&#39; does not exist" in missing.text
    assert client.get("/ui/runs/abc").status_code == 404
    # A polled panel gets its designed error state as a fragment (HTMX swaps 4xx/5xx in).
    gone = client.get("/ui/deployments/gone/live", headers={"HX-Request": "true"})
    assert gone.status_code == 404
    assert gone.text.startswith('<div class="panel-error" role="alert">')
    assert "deployment &#39;gone&#39; does not exist" in gone.text
    assert client.get("/ui/nothing/here").status_code == 404
    one = client.get("/ui/runs/compare?ids=1")
    assert one.status_code == 422
    assert "choose between 2 and 5 runs to compare (you chose 1)" in one.text


def test_dataset_and_snapshot_forms_validate_like_the_api(
    client: TestClient, editor: str, db_session: Session, topic_name: str
) -> None:
    form = {
        "csrf_token": editor,
        "name": "ui-cards",
        "topic": topic_name,
        "create_topic": "on",
        "partitions": "2",
        "key_field": "user",
        "label_field": "fraud",
        "task": "binary",
        "features": "amount float\nthis line is wrong",
    }
    bad = client.post("/ui/datasets/_new", data=form)
    assert bad.status_code == 422
    assert "line 2 (&#39;this line is wrong&#39;)" in bad.text
    assert 'value="ui-cards"' in bad.text  # what was typed is kept

    clash = client.post("/ui/datasets/_new", data={**form, "features": "user: float"})
    assert clash.status_code == 422
    assert "key field &#39;user&#39; must not also be a feature" in clash.text

    created = client.post(
        "/ui/datasets/_new", data={**form, "features": FEATURES}, follow_redirects=False
    )
    assert created.status_code == 303, created.text
    assert created.headers["location"] == "/ui/datasets/ui-cards"
    detail = client.get("/ui/datasets/ui-cards")
    assert f"topic {topic_name} created" in detail.text
    assert "No snapshots yet" in detail.text
    features = client.get("/ui/datasets/ui-cards/features").text
    assert "This dataset has no event-time field" in features
    assert "PARTITION BY user ORDER BY _timestamp" in features  # the starter query

    bad_range = client.post(
        "/ui/datasets/ui-cards/versions",
        data={"csrf_token": editor, "mode": "time_range", "from": "", "to": ""},
    )
    assert bad_range.status_code == 422
    assert "mode time_range needs" in bad_range.text

    snap = client.post(
        "/ui/datasets/ui-cards/versions",
        data={"csrf_token": editor, "mode": "latest", "description": "first"},
        follow_redirects=False,
    )
    assert snap.status_code == 303
    detail = client.get("/ui/datasets/ui-cards")
    assert "Snapshot v1 pinned: 0 events over 2 partition(s)." in detail.text
    assert "p0 [0, 0)" in detail.text
    assert "p1 [0, 0)" in detail.text
    audit = db_session.scalars(
        select(AuditEvent.action).where(AuditEvent.resource_id.like("ui-cards%"))
    ).all()
    assert sorted(audit) == ["dataset.create", "dataset.version.create"]
    control = client.post(
        "/ui/datasets/ui-cards/versions", data={"csrf_token": editor, "description": "a\u0007b"}
    )
    assert control.status_code == 422
    assert "must not contain control characters" in control.text
    # A second snapshot with no new events is allowed, and said so.
    again = client.post("/ui/datasets/ui-cards/versions", data={"csrf_token": editor})
    assert "v2 pins the same offsets as v1: no new events arrived" in again.text
    assert "same events as v1" in again.text

    sample = client.get("/ui/datasets/ui-cards/sample", headers={"HX-Request": "true"})
    assert sample.status_code == 200
    assert "The topic is empty" in sample.text


def test_the_live_sample_checks_each_event_against_the_schema(
    client: TestClient, editor: str, stack_settings: Settings, topic_name: str
) -> None:
    from confluent_kafka import Producer

    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, 1)
    producer = Producer({"bootstrap.servers": stack_settings.kafka_bootstrap})

    def send(event: dict[str, object]) -> None:
        producer.produce(topic_name, value=orjson.dumps(event))
        assert producer.flush(10) == 0

    send({"user": "u1", "amount": 1.5, "items": 2, "country": "FR", "fraud": 0})
    form = {
        "csrf_token": editor,
        "name": "ui-sampled",
        "topic": topic_name,
        "key_field": "user",
        "label_field": "fraud",
        "task": "binary",
        "features": FEATURES,
    }
    assert client.post("/ui/datasets/_new", data=form, follow_redirects=False).status_code == 303
    # A producer later sends an event that breaks the schema: the sample shows it.
    send({"user": "u2", "amount": "lots", "items": 2, "country": "FR", "fraud": 1})
    sample = client.get("/ui/datasets/ui-sampled/sample", headers={"HX-Request": "true"})
    assert sample.status_code == 200
    assert "2 newest events" in sample.text
    assert "1 disagree with the schema" in sample.text
    assert "check amount" in sample.text
    assert "&#34;amount&#34;: &#34;lots&#34;" in sample.text


def test_a_viewer_sees_no_edit_controls_and_is_refused_edits(
    client: TestClient, db_session: Session
) -> None:
    csrf = sign_in(client, token(db_session, Role.viewer, "ui-reader"))
    for path in ("/ui/datasets", "/ui/runs", "/ui/deployments", "/ui/models"):
        page = client.get(path)
        assert page.status_code == 200
        assert 'class="btn btn-primary"' not in page.text, path
        # The only form that posts is signing out.
        assert page.text.count('method="post"') == 1, path
    refused = client.post(
        "/ui/datasets/_new",
        data={"csrf_token": csrf, "name": "x", "topic": "x", "features": FEATURES},
    )
    assert refused.status_code == 403
    assert "Not allowed" in refused.text
    assert (
        "This needs the editor role; token &#39;ui-reader&#39; has the viewer role" in refused.text
    )
    assert client.get("/ui/datasets/_new").status_code == 403
    named_x = select(func.count()).select_from(Dataset).where(Dataset.name == "x")
    assert db_session.scalar(named_x) == 0


def test_every_form_post_of_the_ui_checks_the_csrf_token(client: TestClient, editor: str) -> None:
    posts = [
        "/ui" + route.path
        for module in (
            signin,
            datasets,
            feature_sets,
            runs,
            run_detail,
            models,
            deployment_edit,
            deployments,
        )
        for route in module.router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    ]
    assert len(posts) >= 12
    for path in posts:
        url = re.sub(r"\{(run_id|version)\}", "1", re.sub(r"\{(name|alias)\}", "x", path))
        response = client.post(url, data={"csrf_token": "stolen"})
        assert response.status_code == 403, path
        assert "This form has expired" in response.text, path


def test_posts_without_the_session_csrf_token_are_refused(
    client: TestClient, editor: str, db_session: Session
) -> None:
    response = client.post("/ui/runs/1/cancel", data={"csrf_token": "not-it"})
    assert response.status_code == 403
    assert "This form has expired" in response.text
    # HTMX sends the token as a header instead.
    response = client.post(
        "/ui/runs/999999/cancel", headers={"X-CSRF-Token": editor}, follow_redirects=False
    )
    assert response.status_code == 303  # past the CSRF check: the run does not exist
    assert "run 999999 does not exist" in client.get("/ui/runs").text


def test_the_run_form_is_generated_from_the_algorithms_and_validated_by_them(
    client: TestClient, editor: str, db_session: Session, topic_name: str
) -> None:
    form = {
        "csrf_token": editor,
        "name": "ui-runs",
        "topic": topic_name,
        "create_topic": "on",
        "partitions": "1",
        "key_field": "user",
        "label_field": "fraud",
        "task": "binary",
        "features": FEATURES,
    }
    client.post("/ui/datasets/_new", data=form)
    client.post("/ui/datasets/ui-runs/versions", data={"csrf_token": editor, "mode": "latest"})

    page = client.get("/ui/runs/new?dataset_version=ui-runs@1&algorithm=logistic_regression")
    assert page.status_code == 200
    assert 'name="param.C"' in page.text
    assert 'name="param.max_iter"' in page.text
    assert "&gt; 0 and ≤ 1,000,000" in page.text  # bounds from the JSON schema
    assert "Linear regression" not in page.text  # not offered for a binary dataset
    fragment = client.get(
        "/ui/runs/new/algorithm?dataset_version=ui-runs@1&algorithm=autoencoder",
        headers={"HX-Request": "true"},
    )
    assert 'name="param.hidden_layers"' in fragment.text

    run_form = {
        "csrf_token": editor,
        "dataset_version": "ui-runs@1",
        "algorithm": "logistic_regression",
        "param.C": "-1",
        "param.max_iter": "",
        "param.class_weight": "balanced",
        "holdout_method": "hash",
        "holdout_fraction": "0.25",
        "holdout_seed": "0",
        "registered_model_name": "ui-runs-model",
        "idempotency_key": "ui-test-key",
    }
    bad = client.post("/ui/runs/new", data=run_form)
    assert bad.status_code == 422
    assert 'id="param.C-error"' in bad.text
    assert "greater than 0" in bad.text
    ours = (
        select(func.count())
        .select_from(TrainingRun)
        .where(TrainingRun.registered_model_name == "ui-runs-model")
    )
    assert db_session.scalar(ours) == 0

    good = client.post("/ui/runs/new", data={**run_form, "param.C": "0.5"}, follow_redirects=False)
    assert good.status_code == 303
    run = db_session.scalar(
        select(TrainingRun).where(TrainingRun.registered_model_name == "ui-runs-model")
    )
    assert good.headers["location"] == f"/ui/runs/{run.id}"
    assert run.params["C"] == 0.5
    assert run.params["max_iter"] == 1000
    assert run.params["class_weight"] == "balanced"
    assert run.holdout == {"method": "hash", "fraction": 0.25, "seed": 0}
    # A second submit of the same form (double click) does not start a second run.
    again = client.post("/ui/runs/new", data={**run_form, "param.C": "0.5"}, follow_redirects=False)
    assert again.headers["location"] == f"/ui/runs/{run.id}"
    assert db_session.scalar(ours) == 1

    detail = client.get(f"/ui/runs/{run.id}")
    assert "Waiting for a training worker" in detail.text
    assert f'hx-get="/ui/runs/{run.id}/progress?was=queued"' in detail.text
    assert client.get("/ui/runs?status=queued&dataset=ui-runs").text.count(f"#{run.id}") == 1
    assert client.get("/ui/runs?status=bogus").status_code == 422
    cancelled = client.post(f"/ui/runs/{run.id}/cancel", data={"csrf_token": editor})
    assert cancelled.status_code == 200  # followed to the run page
    assert f"Run #{run.id} cancelled." in cancelled.text
    progress = client.get(f"/ui/runs/{run.id}/progress?was=queued", headers={"HX-Request": "true"})
    assert progress.headers["HX-Refresh"] == "true"  # finished: reload the whole page


def test_deployment_edits_are_confirmed_on_a_diff_and_rolled_back(
    client: TestClient, editor: str, db_session: Session, io_topics: tuple[str, str]
) -> None:
    for version in (1, 2):
        registry.register_version(db_session, "ui-model", version, None, "models:/x", {})
    db_session.commit()
    form = {
        "csrf_token": editor,
        "name": "ui-scoring",
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user",
        "pool": "default",
        "variants-0-name": "champion",
        "variants-0-model": "ui-model",
        "variants-0-version": "1",
        "variants-0-weight": "90",
        "reason": "first",
    }
    bad = client.post("/ui/deployments/_new", data=form)
    assert bad.status_code == 422
    assert "the weights of live variants must sum to 100, got 90" in bad.text
    missing = client.post(
        "/ui/deployments/_new", data={**form, "variants-0-weight": "100", "variants-0-version": "7"}
    )
    assert missing.status_code == 422
    assert "model &#39;ui-model&#39; has no version 7" in missing.text

    preview = client.post("/ui/deployments/_new", data={**form, "variants-0-weight": "100"})
    assert preview.status_code == 200
    assert "Create deployment ui-scoring" in preview.text
    assert "diff-added" in preview.text
    dry = select(func.count()).select_from(Deployment).where(Deployment.name == "ui-scoring")
    assert db_session.scalar(dry) == 0  # a dry run
    applied = client.post(
        "/ui/deployments/ui-scoring/apply",
        data={
            "csrf_token": editor,
            "expected_revision": "",
            "body": re.search(r'name="body" value="([^"]+)"', preview.text)[1].replace(
                "&#34;", '"'
            ),
        },
    )
    assert applied.status_code == 200
    assert "Revision 1 stored and published to scorers." in applied.text

    edit = client.get("/ui/deployments/ui-scoring/edit?challenger=true")
    assert 'value="challenger"' in edit.text
    assert 'value="2"' in edit.text
    change = {
        **form,
        "variants-0-weight": "90",
        "variants-1-name": "challenger",
        "variants-1-model": "ui-model",
        "variants-1-version": "2",
        "variants-1-weight": "10",
        "reason": "add a challenger at 10%",
    }
    change.pop("name")
    diff = client.post("/ui/deployments/ui-scoring/preview", data=change)
    assert diff.status_code == 200
    assert "diff-added" in diff.text
    assert "diff-changed" in diff.text
    assert "<strong>100%</strong>" in diff.text
    assert "<strong>90%</strong>" in diff.text
    body = re.search(r'name="body" value="([^"]+)"', diff.text)[1].replace("&#34;", '"')
    stale = client.post(
        "/ui/deployments/ui-scoring/apply",
        data={"csrf_token": editor, "expected_revision": "7", "body": body},
    )
    assert "changed while you were reviewing" in stale.text
    client.post(
        "/ui/deployments/ui-scoring/apply",
        data={"csrf_token": editor, "expected_revision": "1", "body": body},
    )
    detail = client.get("/ui/deployments/ui-scoring")
    assert "Variants · revision 2" in detail.text
    assert "Roll back to r1" in detail.text

    confirm = client.post(
        "/ui/deployments/ui-scoring/rollback/preview", data={"csrf_token": editor, "revision": "1"}
    )
    assert "Roll ui-scoring back to revision 1" in confirm.text
    assert "diff-removed" in confirm.text
    done = client.post(
        "/ui/deployments/ui-scoring/rollback",
        data={"csrf_token": editor, "expected_revision": "2", "rollback_to": "1", "reason": "oops"},
    )
    assert "Rolled back: revision 3 restores revision 1." in done.text
    revisions = db_session.scalars(
        select(DeploymentRevision.reason)
        .join(Deployment, Deployment.id == DeploymentRevision.deployment_id)
        .where(Deployment.name == "ui-scoring")
        .order_by(DeploymentRevision.number)
    ).all()
    assert revisions == ["first", "add a challenger at 10%", "rollback to revision 1: oops"]

    for fragment in ("live", "verdict", "drift", "rollout"):
        response = client.get(
            f"/ui/deployments/ui-scoring/{fragment}", headers={"HX-Request": "true"}
        )
        assert response.status_code == 200, (fragment, response.text)
    assert "No traffic yet" in client.get("/ui/deployments/ui-scoring/live").text
    # Once the monitor counted a minute: end-to-end latency next to the in-process scoring time.
    now = datetime.now(UTC)
    db_session.add(
        VariantMetrics(
            deployment="ui-scoring",
            variant="champion",
            bucket_start=now.replace(second=0, microsecond=0),
            model_version=1,
            predictions=10,
            score_sum=5.0,
            score_histogram=[10] + [0] * 19,
            latency_histogram=[0, 10] + [0] * len(LATENCY_EDGES_MS[1:]),  # in (1, 2] ms
            end_to_end_histogram=[0, 0, 0, 10] + [0] * len(END_TO_END_EDGES_MS[3:]),  # (5, 10]
        )
    )
    db_session.commit()
    # The panel read above is remembered for CARRARA_MONITORING_CACHE_S (the documented bound of
    # how late a new minute shows): forget it rather than wait.
    client.app.state.monitoring_cache.clear()
    live = client.get("/ui/deployments/ui-scoring/live").text
    assert "End to end ms" in live
    assert "Scoring ms" in live
    assert 'data-metric="p50-end-to-end">7.5<' in live  # 5 + 5 * 5/10
    assert 'data-metric="p99-end-to-end">9.95<' in live
    assert 'data-metric="p50-scoring">1.5<' in live
    assert 'data-metric="p99-scoring">1.99<' in live
    chart = orjson.loads(re.search(r'id="live-data">(.*?)</script>', live, re.DOTALL)[1])
    (series,) = chart["series"]
    assert 7.5 in series["end_to_end_p50"]
    assert 1.5 in series["p50"]
    assert "Nothing to compare" in client.get("/ui/deployments/ui-scoring/verdict").text
    overview = client.get("/ui/")
    assert "ui-scoring" in overview.text
    # The model's lineage says which deployments serve each version.
    model_page = client.get("/ui/models/ui-model").text
    assert 'id="v1-deployments"' in model_page
    assert '<a href="/ui/deployments/ui-scoring">ui-scoring</a>' in model_page
    assert 'id="v2-deployments"' not in model_page  # rolled back to v1 only

    # Stop it from its page, then start it again with the spec it ran last.
    page = client.get("/ui/deployments/ui-scoring").text
    assert 'action="/ui/deployments/ui-scoring/stop"' in page
    stopped = client.post("/ui/deployments/ui-scoring/stop", data={"csrf_token": editor})
    assert "Stopped: revision 4 tells the scorers to stop it." in stopped.text
    assert f'It ran revision 3: <span class="mono">{io_topics[0]}</span>' in stopped.text
    assert 'action="/ui/deployments/ui-scoring/restart"' in stopped.text
    listed = client.get("/ui/deployments?status=stopped").text
    assert f"{io_topics[0]} → {io_topics[1]}" in listed  # the topics it used, not "—"
    overview = client.get("/ui/").text
    # Not among the running ones (other tests' committed deployments may be), and the stopped
    # ones are mentioned.
    running_part = overview.split('id="overview-stopped"')[0]
    assert '<td><a href="/ui/deployments/ui-scoring">' not in running_part
    assert 'id="overview-stopped"' in overview
    restarted = client.post("/ui/deployments/ui-scoring/restart", data={"csrf_token": editor})
    assert "Started: revision 5 runs the spec it ran before it stopped." in restarted.text
    current = db_session.scalar(select(Deployment).where(Deployment.name == "ui-scoring"))
    assert current is not None
    assert current.stopped_at is None
    assert current.current_revision == 5


def test_the_deployment_form_reports_every_invalid_field_at_once_in_words(
    client: TestClient, editor: str, db_session: Session, io_topics: tuple[str, str]
) -> None:
    registry.register_version(db_session, "ui-model", 1, None, "models:/x", {})
    db_session.commit()
    empty = client.post("/ui/deployments/_new", data={"csrf_token": editor, "name": ""})
    assert empty.status_code == 422
    for field in ("name", "input_topic", "output_topic", "key_field"):
        assert f'<p class="field-error" id="{field}-error">required</p>' in empty.text, field
    assert "add at least one variant" in empty.text
    form = {
        "csrf_token": editor,
        "name": "a" * 300,
        "input_topic": io_topics[0],
        "output_topic": io_topics[0],
        "key_field": "user\u0007",
        "pool": "default",
        "variants-0-name": "champion",
        "variants-0-model": "no-such-model",
        "variants-0-version": "champion",
        "variants-0-weight": "100",
    }
    bad = client.post("/ui/deployments/_new", data=form)
    assert bad.status_code == 422
    assert "too long: at most 100 characters (this has 300)" in bad.text
    assert "must not contain control characters" in bad.text
    assert "Variant 1 model: no registered model is named &#39;no-such-model&#39;" in bad.text
    assert "pattern" not in bad.text
    assert "0.weight" not in bad.text
    # A pool no scorer has reported from is accepted, with a warning on the diff to confirm.
    form = {**form, "name": "ui-pool", "output_topic": io_topics[1], "key_field": "user"}
    form |= {"variants-0-model": "ui-model", "variants-0-version": "1", "pool": "nowhere"}
    preview = client.post("/ui/deployments/_new", data=form)
    assert preview.status_code == 200, preview.text
    assert 'id="pool-warning"' in preview.text
    assert "No scorer has ever reported from pool <strong>nowhere</strong>" in preview.text


def test_api_docs_and_the_favicon_are_served_from_local_assets(client: TestClient) -> None:
    for path, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        page = client.get(path)
        assert page.status_code == 200
        assert f"/ui/static/vendor/{asset}" in page.text
        assert "cdn.jsdelivr" not in page.text
        assert "fonts.googleapis" not in page.text
        assert "fastapi.tiangolo.com" not in page.text
        assert client.get(f"/ui/static/vendor/{asset}").status_code == 200
    favicon = client.get("/favicon.ico", follow_redirects=True)
    assert favicon.status_code == 200
    assert favicon.headers["content-type"].startswith("image/svg+xml")


def test_reloading_the_address_of_a_form_post_lands_on_its_page(
    client: TestClient, editor: str
) -> None:
    for posted, page in (
        ("/ui/datasets/cards/versions", "/ui/datasets/cards"),
        ("/ui/datasets/cards/features/preview", "/ui/datasets/cards/features"),
        ("/ui/deployments/scoring/preview", "/ui/deployments/scoring"),
        ("/ui/deployments/scoring/rollback/preview", "/ui/deployments/scoring"),
        ("/ui/models/fraud/aliases", "/ui/models/fraud"),
    ):
        response = client.get(posted, follow_redirects=False)
        assert response.status_code == 303, posted
        assert response.headers["location"] == page
    assert client.get("/ui/no/such/page", follow_redirects=False).status_code == 404
    bogus = client.get("/ui/runs?algorithm=bogus")
    assert bogus.status_code == 422
    assert "unknown algorithm &#39;bogus&#39;" in bogus.text


def test_ui_routes_stay_out_of_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_missing_vendored_assets_answer_503_with_the_fix(
    client: TestClient, editor: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(templating, "STATIC_DIR", tmp_path)
    response = client.get("/ui/datasets")
    assert response.status_code == 503
    assert "run `deploy/bootstrap.sh web`" in response.text
    assert "htmx.min.js" in response.text


FEATURE_SQL = """SELECT LN(amount + 1) AS log_amount,
       COUNT(*) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS n_1h,
       ts - LAG(ts) OVER (PARTITION BY user ORDER BY ts) AS gap
FROM "{name}\""""


def test_the_feature_set_page_edits_previews_and_lists_revisions(
    client: TestClient,
    editor: str,
    db_session: Session,
    stack_settings: Settings,
    topic_name: str,
) -> None:
    from confluent_kafka import Producer

    base_ms = 1_714_564_800_000
    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, 1)
    producer = Producer({"bootstrap.servers": stack_settings.kafka_bootstrap})
    for i, (user, seconds, amount) in enumerate(
        [("u1", 0, 10.0), ("u2", 30, 5.0), ("u1", 60, 20.0), ("u1", 4000, 1.0)]
    ):
        event = {
            "user": user,
            "ts": base_ms + seconds * 1000,
            "amount": amount,
            "items": i,
            "fraud": 0,
        }
        producer.produce(topic_name, key=user, value=orjson.dumps(event))
    assert producer.flush(10) == 0
    name = "ui-feats"
    form = {
        "csrf_token": editor,
        "name": name,
        "topic": topic_name,
        "key_field": "user",
        "event_time_field": "ts",
        "label_field": "fraud",
        "task": "binary",
        "features": "amount: float\nitems: int",
    }
    assert client.post("/ui/datasets/_new", data=form, follow_redirects=False).status_code == 303
    detail = client.get(f"/ui/datasets/{name}")
    assert f'href="/ui/datasets/{name}/features"' in detail.text
    assert "write a feature set" in detail.text

    page = client.get(f"/ui/datasets/{name}/features")
    assert page.status_code == 200
    assert "No feature set yet" in page.text
    assert "PARTITION BY user ORDER BY ts" in page.text  # a starter query on its key and time
    url = f"/ui/datasets/{name}/features"
    sql = FEATURE_SQL.format(name=name)

    # The parser's error next to the editor: message, line and column, the line and a caret.
    wrong = sql.replace(
        "PARTITION BY user ORDER BY ts RANGE", "PARTITION BY items ORDER BY ts RANGE"
    )
    refused = client.post(url, data={"csrf_token": editor, "sql": wrong.replace("\n", "\r\n")})
    assert refused.status_code == 422
    assert (
        "line 2, column 36: COUNT OVER must be PARTITION BY user: the dataset&#39;s key"
        in refused.text
    )
    assert 'data-error-line="2" data-error-column="36"' in refused.text
    assert "2 │ </span>       COUNT(*) OVER (PARTITION BY items" in refused.text
    assert " " * 35 + "^" in refused.text
    assert "PARTITION BY items" in refused.text  # what was typed is kept
    unparsable = client.post(url, data={"csrf_token": editor, "sql": "SELECT amount +"})
    assert unparsable.status_code == 422
    assert "line 1, column 15: not valid SQL" in unparsable.text
    too_late = client.post(
        url, data={"csrf_token": editor, "sql": sql, "allowed_lateness_ms": "-5"}
    )
    assert too_late.status_code == 422
    assert "must be at least 0" in too_late.text

    saved = client.post(
        url,
        data={"csrf_token": editor, "sql": sql.replace("\n", "\r\n"), "reason": "first"},
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    assert saved.headers["location"] == url
    shown = client.get(url)
    assert "Revision 1 saved: 3 feature(s), horizon 1 h." in shown.text
    assert "log_amount" in shown.text
    assert "n_1h" in shown.text
    again = client.post(url, data={"csrf_token": editor, "sql": sql}, follow_redirects=True)
    assert "Unchanged: this is revision 1&#39;s definition, so nothing was stored." in again.text
    changed = sql.replace("'1' HOUR", "'2' HOUR")
    client.post(url, data={"csrf_token": editor, "sql": changed, "reason": "two hours"})
    audit = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "dataset.features.update", AuditEvent.resource_id == name
        )
    ).all()
    assert [(a.actor, a.after["number"]) for a in audit] == [("ui-editor", 1), ("ui-editor", 2)]
    assert audit[0].after["sql"] == sql  # CRLF from the browser stored as LF

    page = client.get(url)
    assert "Revision 2" in page.text
    assert "<dd>2 h <span" in page.text
    assert page.text.count('aria-label="View revision') == 2
    old = client.get(f"{url}?revision=1")
    assert old.status_code == 200
    assert "This is an older revision: new training runs compute revision 2." in old.text
    assert "RANGE INTERVAL &#39;1&#39; HOUR" in old.text
    assert client.get(f"{url}?revision=9").status_code == 404
    assert client.get("/ui/datasets/no-such/features").status_code == 404
    assert "revision 2</a>" in client.get(f"/ui/datasets/{name}").text

    # The preview: the editor's SQL (not saved) on the newest events, as a table.
    preview = client.post(f"{url}/preview", data={"csrf_token": editor, "sql": sql, "events": "10"})
    assert preview.status_code == 200, preview.text[-3000:]
    assert "the SQL above (not saved)" in preview.text
    rows = re.findall(r"<tr>\s*<td>p0</td>(.*?)</tr>", preview.text, re.S)
    assert len(rows) == 4
    cells = [re.findall(r'<td class="num mono">([^<]*)</td>', row) for row in rows]
    # u1: 1 event, then 2 (60 s after), then 1 with no gap: 4000 s later is past the horizon
    # (1 h, the longest window), so its history was forgotten (README, "Features in SQL").
    assert [c[1:] for c in cells] == [["1", "—"], ["1", "—"], ["2", "60"], ["1", "—"]]
    current = client.post(f"{url}/preview", data={"csrf_token": editor, "events": "2"})
    assert "Preview · revision 2" in current.text
    assert len(re.findall(r"<tr>\s*<td>p0</td>", current.text)) == 2
    bad_preview = client.post(
        f"{url}/preview", data={"csrf_token": editor, "sql": wrong, "events": "0"}
    )
    assert bad_preview.status_code == 422
    assert "a whole number of events, 1 to 1,000" in bad_preview.text
    bad_sql = client.post(f"{url}/preview", data={"csrf_token": editor, "sql": wrong})
    assert bad_sql.status_code == 422
    assert "line 2, column 36: COUNT OVER must be PARTITION BY user" in bad_sql.text

    # A viewer reads and previews the current revision; saving is refused.
    client.post("/ui/sign-out", data={"csrf_token": editor})
    viewer = sign_in(client, token(db_session, Role.viewer, "ui-feature-reader"))
    read = client.get(url)
    assert "<textarea" not in read.text
    assert "Save as a new revision" not in read.text
    seen = client.post(f"{url}/preview", data={"csrf_token": viewer, "events": "3"})
    assert seen.status_code == 200
    assert "Preview · revision 2" in seen.text
    refused = client.post(url, data={"csrf_token": viewer, "sql": sql})
    assert refused.status_code == 403
    assert (
        db_session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.resource_id == name)
        )
        == 3
    )  # the dataset and its two revisions
