"""One table per kind of variant (RL algorithms, teachers, benchmark tasks, rollout engines, data formats, rewards,
align advantage modes, trackers; docs/design.md lists them): a name maps to what the variant is, and an unknown
name fails with one line that lists the registered ones."""

from __future__ import annotations

from typing import Generic, TypeVar

from stages.common.contract.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named variants of one kind, in registration order (the order help texts and errors list them in)."""

    def __init__(self, kind: str, option: str):
        self.kind = kind          # "RL algorithm": what a variant is, for messages
        self.option = option      # "--algo": where a user names one
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UsageError(f"unknown {self.option} {name!r}: registered {self.kind}s are {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()
