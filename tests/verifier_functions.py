"""User verifier functions for the tests (`judge.verifier: python:tests.verifier_functions:<name>`)."""

import time


def sleeps(prompt: str, response: str, answer: str) -> float:
    """Hangs on a response saying `hang`, otherwise checks the answer's presence."""
    if "hang" in response:
        time.sleep(60)
    return float(answer in response)


def fails(prompt: str, response: str, answer: str) -> float:
    raise RuntimeError("this verifier has a bug")
