"""mailhost.multiproc.loads: every process's count of open sessions, in memory the main
process creates and each worker maps through the descriptor it inherits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailhost.multiproc.loads import ABSENT, SessionLoads


def test_a_worker_is_absent_until_it_publishes_then_the_fewest_counts() -> None:
    main = SessionLoads.create(3)
    try:
        assert main.fewest_elsewhere() is None  # no worker accepts yet: nobody to leave a connection to
        one = SessionLoads.attach(main.fileno(), 3, 1)
        two = SessionLoads.attach(main.fileno(), 3, 2)
        one.publish(4)
        assert main.fewest_elsewhere() == 4 and one.fewest_elsewhere() == 0
        two.publish(2)
        assert main.fewest_elsewhere() == 2 and two.fewest_elsewhere() == 0
        main.publish(7)
        assert one.fewest_elsewhere() == 2 and two.fewest_elsewhere() == 4
        main.mark_absent(2)  # worker 2 ended
        assert main.fewest_elsewhere() == 4 and one.fewest_elsewhere() == 7
        one.publish(-3)  # never below zero (never mistaken for ABSENT)
        assert main.fewest_elsewhere() == 0
    finally:
        main.close()


def test_another_process_sees_what_we_publish_and_we_see_its_count() -> None:
    """The real boundary: a child process maps the descriptor it inherited, as a worker does."""
    main = SessionLoads.create(2)
    try:
        main.publish(5)
        fd = main.fileno()
        script = ("import sys; from mailhost.multiproc.loads import SessionLoads; "
                  f"worker = SessionLoads.attach({fd}, 2, 1); print(worker.fewest_elsewhere()); worker.publish(3)")
        done = subprocess.run([sys.executable, "-c", script], pass_fds=[fd], capture_output=True, text=True,
                              timeout=60, check=True)
        assert done.stdout.strip() == "5"
        assert main.fewest_elsewhere() == 3
    finally:
        main.close()


@pytest.mark.parametrize("count, index", [(2, 2), (2, -1), (0, 0)])
def test_a_slot_that_is_not_there_is_refused(count: int, index: int) -> None:
    main = SessionLoads.create(2)
    try:
        with pytest.raises(ValueError):
            SessionLoads.attach(main.fileno(), count, index)
    finally:
        main.close()


def test_a_descriptor_too_small_for_the_processes_is_refused() -> None:
    main = SessionLoads.create(2)
    try:
        with pytest.raises(ValueError, match="fewer than 4 slots"):
            SessionLoads.attach(main.fileno(), 4, 3)
    finally:
        main.close()


def test_the_descriptor_is_not_inherited_unless_handed_over() -> None:
    main = SessionLoads.create(2)
    try:
        assert not os.get_inheritable(main.fileno())
        assert ABSENT < 0
    finally:
        main.close()
