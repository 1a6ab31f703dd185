"""schemathesis over the OpenAPI schema: every check, against the real server; no 5xx."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.api.helpers import Api

# Examples in all (every operation draws from one strategy): enough to find a crash, few
# enough for CI.
MAX_EXAMPLES = 300


def test_api_conforms_to_its_schema(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    # No worker here: /readyz's 503 for that is right, and not what this test is about.
    with start_api(ready_requires_worker=False) as api:
        _conforms(api)


def _conforms(api: Api) -> None:
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        # Every check but one: rules that span fields or depend on settings (prompt or
        # messages, a served model, max_tokens under the model's context) are not in the
        # schema, so schema-valid bodies may rightly get a 400. A 5xx always fails.
        # ignored_auth takes the key sent here for one it generated and reports its success
        # as auth not enforced; tests/api/test_auth.py walks every route for 401 and 404.
        case.call_and_validate(
            headers=dict(api.http.headers),
            excluded_checks=[positive_data_acceptance, ignored_auth],
        )

    run()
