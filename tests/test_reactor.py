"""tests/reactor.py: the pause the tests' pynetdicom SCUs rely on, without pynetdicom's race."""

from __future__ import annotations

import threading

from pynetdicom import AE
from pynetdicom.association import Association

from tests.reactor import ReactorCheckpoint


def test_clearing_the_checkpoint_returns_only_once_the_reactor_is_back_in_its_wait() -> None:
    checkpoint = ReactorCheckpoint()
    inside, go = threading.Event(), threading.Event()
    passes: list[int] = []

    def reactor() -> None:  # pynetdicom's loop: wait on the checkpoint, then take a message
        for number in range(2):
            checkpoint.wait()
            passes.append(number)
            inside.set()
            go.wait(timeout=30)

    looping = threading.Thread(target=reactor)
    looping.start()
    assert inside.wait(timeout=30)  # past its wait: what pynetdicom took for paused
    clearing = threading.Thread(target=checkpoint.clear)
    clearing.start()
    clearing.join(timeout=0.2)
    assert clearing.is_alive()  # an SCU clearing now must not send yet
    go.set()
    clearing.join(timeout=30)
    assert not clearing.is_alive()
    assert passes == [0]  # and the reactor waits: it cannot take the answer
    checkpoint.set()
    looping.join(timeout=30)
    assert passes == [0, 1]


def test_every_association_the_tests_make_has_the_checkpoint() -> None:
    association = Association(AE(), "requestor")  # as AE.associate makes each one
    assert isinstance(association._reactor_checkpoint, ReactorCheckpoint)
