"""The models pages: the ONNX upload form and (admins) marking a version as trusted code."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.models import AuditEvent
from carrara.registry import service as registry
from tests.integration.test_ui_pages import client, sign_in, token

__all__ = ["client"]  # the UI's client fixture: each request commits, as in production


def test_the_upload_form_validates_like_the_api(client: TestClient, db_session: Session) -> None:
    csrf = sign_in(client, token(db_session, Role.editor, "ui-uploader"))
    listing = client.get("/ui/models")
    assert 'href="/ui/models/upload"' in listing.text
    form = client.get("/ui/models/upload")
    assert form.status_code == 200
    assert 'enctype="multipart/form-data"' in form.text
    fields = {
        "csrf_token": csrf,
        "name": "byo-model",
        "dataset": "no-such-dataset",
        "features": "amount,items",
        "output": "class_scores",
    }
    files = {"file": ("model.onnx", b"\x08\x07")}
    missing_classes = client.post("/ui/models/upload", data=fields, files=files)
    assert missing_classes.status_code == 422
    assert "class_scores needs the label of each column" in missing_classes.text
    no_dataset = client.post(
        "/ui/models/upload", data={**fields, "output": "regression"}, files=files
    )
    assert no_dataset.status_code == 404
    assert "dataset &#39;no-such-dataset&#39; does not exist" in no_dataset.text


def test_an_admin_marks_a_version_as_trusted_code_from_the_model_page(
    client: TestClient, db_session: Session
) -> None:
    name = f"ui-trust-{uuid.uuid4().hex[:8]}"
    registry.register_version(db_session, name, 1, None, "models:/m-1", {})
    db_session.commit()
    editor_csrf = sign_in(client, token(db_session, Role.editor, "ui-editor-trust"))
    page = client.get(f"/ui/models/{name}")
    assert "Trust code (pickle, pyfunc)" not in page.text  # admins only
    assert "No pinned digests" in page.text
    refused = client.post(
        f"/ui/models/{name}/versions/1/trust",
        data={"csrf_token": editor_csrf, "trusted_code": "true"},
    )
    assert "needs the admin role" in refused.text

    admin_csrf = sign_in(client, token(db_session, Role.admin, "ui-admin-trust"))
    assert "Trust code (pickle, pyfunc)" in client.get(f"/ui/models/{name}").text
    done = client.post(
        f"/ui/models/{name}/versions/1/trust",
        data={"csrf_token": admin_csrf, "trusted_code": "true", "reason": "reviewed"},
    )
    assert done.status_code == 200
    assert f"{name} v1 is trusted code" in done.text
    assert "Revoke trusted code" in done.text
    assert ">trusted code</span>" in done.text
    event = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.resource_id == name, AuditEvent.action == "model.version.trust"
        )
    ).one()
    assert (event.actor, event.detail) == ("ui-admin-trust", "reviewed")
