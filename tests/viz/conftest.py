"""Fixtures of the live-page tests without a browser: a ``LiveSession`` on MiniLM and a capture of the test
module's ``TEXT``."""

import pytest

from attnscope.dashboards.live_state import LiveSession


@pytest.fixture(scope="module")
def session(minilm):
    return LiveSession(minilm, "minilm")


@pytest.fixture(scope="module")
def cap(session, request):
    return session.capture("minilm", request.module.TEXT)
