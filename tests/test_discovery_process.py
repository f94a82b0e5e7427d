"""The parent side of the discovery child (exporter/discovery_process.py) against children that
misbehave: one that dies mid-answer, one that never answers."""

from __future__ import annotations

import sys

from exporter.discovery_process import DiscoveryProcess


def client_with_child(code: str) -> DiscoveryProcess:
    client = DiscoveryProcess(".+", "", ["service"], "/nonexistent/private", timeout=0.2)
    client._argv = [sys.executable, "-c", code]  # a stand-in child speaking the same pipes
    return client


def test_a_child_that_dies_mid_answer_is_an_unavailable_source_not_a_crash():
    client = client_with_child("import sys; sys.stdin.readline(); sys.stdout.write('{\"ok\": tr'); sys.exit(3)")
    try:
        result = client.request(wait=5)
        assert (result.ok, result.failure) == (False, "unavailable")
        assert "exited" in result.message
        again = client.request(wait=5)  # a new child is started and fails the same way
        assert again.failure == "unavailable"
    finally:
        client.stop()


def test_a_child_that_never_answers_is_a_timeout_and_is_not_waited_for_twice():
    client = client_with_child("import sys, time; sys.stdin.readline(); time.sleep(60)")
    try:
        first = client.request(wait=0.3)
        assert (first.ok, first.failure) == (False, "timeout")
        second = client.request(wait=30)  # still pending: looked at, not waited for
        assert second.failure == "timeout" and "not answered" in second.message
    finally:
        client._kill()
