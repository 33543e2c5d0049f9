"""Who may cancel: the same keys as the status (in-process gateway and read API, real RabbitMQ, Redis, Postgres).

No worker runs here, so the requests stay queued and each cancel wins them.
"""

from __future__ import annotations

import pytest

from events.model import new_event_id
from tests.integration.test_tenancy import Platform, bearer, create_key, platform

pytestmark = pytest.mark.integration
__all__ = ["platform"]  # the fixture, imported for this module

SEED = {"prompt": "test prompt", "model": "basic-model"}


async def test_another_users_request_is_not_theirs_to_cancel_an_admin_reaches_all(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = await create_key(capsys, platform, "alice")
    bob = await create_key(capsys, platform, "bob")
    admin = await create_key(capsys, platform, "ops", "--admin")
    platform.clock.advance(seconds=platform.settings.auth_cache_ttl_s)
    gw, api = platform.gateway, platform.api

    mine = (await gw.post("/api/v1/inference", json={**SEED, "user_id": "alice"}, headers=bearer(alice))).json()
    bobs = (await gw.post("/api/v1/inference", json={**SEED, "user_id": "bob"}, headers=bearer(bob))).json()
    a_id, b_id = mine["request_id"], bobs["request_id"]

    # bob learns alice's id: answered as an unknown one, and nothing changes
    refused = await gw.post(f"/api/v1/inference/{a_id}/cancel", headers=bearer(bob))
    assert (refused.status_code, refused.json()) == (404, {"error": "not_found", "detail": f"no request {a_id}"})
    assert (await api.get(f"/api/v1/inference/{a_id}", headers=bearer(alice))).json()["status"] == "queued"
    assert (await gw.post(f"/api/v1/inference/{a_id}/cancel")).status_code == 401

    own = await gw.post(f"/api/v1/inference/{a_id}/cancel", headers=bearer(alice))
    assert own.status_code == 202, own.text
    assert (own.json()["request_id"], own.json()["status"], own.json()["user_id"]) == (a_id, "cancelled", "alice")
    shown = (await api.get(f"/api/v1/inference/{a_id}", headers=bearer(alice))).json()
    assert (shown["status"], shown["error"]["code"]) == ("cancelled", "cancelled")
    again = await gw.post(f"/api/v1/inference/{a_id}/cancel", headers=bearer(alice))
    assert (again.status_code, again.json()["status"]) == (202, "cancelled")

    by_admin = await gw.post(f"/api/v1/inference/{b_id}/cancel", headers=bearer(admin))
    assert (by_admin.status_code, by_admin.json()["status"]) == (202, "cancelled")
    unknown = new_event_id()
    assert (await gw.post(f"/api/v1/inference/{unknown}/cancel", headers=bearer(admin))).status_code == 404
    assert (await gw.post("/api/v1/inference/not%20an%20id/cancel", headers=bearer(admin))).status_code == 422
