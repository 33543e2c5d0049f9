-- 0004: listing requests newest first by keyset (GET /api/v1/inference, projections/listing.py).
--
-- The order is (created_at, request_id): total and stable, so a page resumes strictly after the previous
-- page's last row. A user's listing seeks into the first index, an admin's listing across users into the
-- second; both are scanned backwards for newest first. The first supersedes 0001's (user_id, created_at)
-- index, which is its prefix. Replay rebuilds every index of the live table, these included.

CREATE INDEX inference_requests_user_listing ON inference_requests (user_id, created_at, request_id);
CREATE INDEX inference_requests_listing ON inference_requests (created_at, request_id);
DROP INDEX inference_requests_user;
