"""What the model-based tests share (tests/test_protocol_model.py, tests/test_fault_model.py): the namespace
model, the path and payload strategies, the session machine's bookkeeping and the loop that runs examples until
enough steps are done."""

from __future__ import annotations

import itertools
from typing import Callable

from clients import ClientError
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

DIRS = ["A", "B"]
FILES = ["a", "b", "c"]
_examples = itertools.count()


class Model:
    """Directories and files (path → bytes) below one example's base directory."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()
        self.files: dict[str, bytes] = {}

    def children(self, d: str) -> list[str]:
        pre = d + "/" if d else ""
        names = {p[len(pre):] for p in [*self.dirs, *self.files] if p.startswith(pre) and "/" not in p[len(pre):]}
        return sorted(names)

    def parent_exists(self, p: str) -> bool:
        parent = p.rpartition("/")[0]
        return not parent or parent in self.dirs


def file_paths() -> st.SearchStrategy[str]:
    return st.sampled_from(FILES + [f"{d}/{f}" for d in DIRS for f in FILES])


def payloads(max_size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=0, max_size=max_size) | st.sampled_from([b"", b"x", b"0123456789"])


class Session(RuleBasedStateMachine):
    """One example: a client session in a base directory of its own, its model, the directories whose listing
    the last step can have changed. Subclasses add the rules."""

    label = ""  # put before assertion messages (the protocol)

    def __init__(self, letter: str, models: dict[str, Model], client) -> None:
        super().__init__()
        self.base = f"{letter}{next(_examples)}"
        self.model = models[self.base] = Model()
        self.touched: set[str] = set()
        self.client = client
        self.client.mkdir(self.base)

    def p(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def touch(self, *paths: str) -> None:
        """The directories whose listing the step can have changed ('' the base: also when it may create
        a directory there)."""
        for p in paths:
            parent = p.rpartition("/")[0]
            self.touched.update([parent] if parent in self.model.dirs else [parent, ""])

    def expect(self, ok: bool, call, *args) -> bool:
        """Run the operation; it must succeed exactly when the model says it may."""
        try:
            call(*args)
        except ClientError as e:
            assert not ok, f"{self.label}{call.__name__}{args} refused but the model allows it: {e}"
            return False
        assert ok, f"{self.label}{call.__name__}{args} succeeded but the model refuses it"
        return True

    def reconnect(self, client) -> None:
        """A new session after the agent was killed (the old one died with it)."""
        try:
            self.client.close()
        except Exception:  # the server side of this session died with the agent
            pass
        self.client = client
        self.touched.update([*self.model.dirs, ""])

    def check_listings(self, dirs: set[str]) -> None:
        for d in sorted(dirs & {"", *self.model.dirs}):
            assert self.client.list(self.p(d) if d else self.base) == self.model.children(d), \
                f"{self.label}listing of {d!r}"
        self.touched.clear()


def run_examples(machine: type[Session], done: Callable[[], int], steps: int, per_example: int,
                 shrink: bool = True) -> None:
    """Random examples of up to per_example steps until done() (the steps so far) reaches steps. shrink=False:
    no shrinking (a long run's live agent cannot be replayed)."""
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]
    while done() < steps:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=max(1, (steps - done()) // per_example), stateful_step_count=per_example, deadline=None,
            database=None, derandomize=False, print_blob=True, suppress_health_check=list(HealthCheck),
            phases=phases))
