"""A mapping whose values are decoded on demand (what a packed file's layers and tensors are)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping


class DecodedEntries(Mapping):
    """Entries decoded from the file on demand. A value looked up by key is kept (what a
    caller was handed stays what everyone reads); ``items()``/``values()`` decode without
    keeping, so a pass over a large model holds one entry at a time."""

    def __init__(self, keys: List[str], decode: Callable[[str], Any], sources: Mapping[str, str]) -> None:
        self._keys, self._decode, self._sources, self._kept = keys, decode, sources, {}

    def fresh(self, key: str) -> Any:
        key = self._sources.get(key, key)
        return self._kept[key] if key in self._kept else self._decode(key)

    def __getitem__(self, key: str) -> Any:
        if key not in self._sources and key not in self._keys:
            raise KeyError(key)
        source = self._sources.get(key, key)
        if source not in self._kept:
            self._kept[source] = self._decode(source)
        return self._kept[source]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._sources or key in self._keys

    def items(self):  # type: ignore[override]
        return ((key, self.fresh(key)) for key in self._keys)

    def values(self):  # type: ignore[override]
        return (self.fresh(key) for key in self._keys)


__all__ = ["DecodedEntries"]
