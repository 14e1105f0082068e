"""Which replica owns each session ref the router saw in a response, and the few bytes of a response it
reads to learn it."""

from __future__ import annotations

from collections import OrderedDict

from ..wire.postcard import Reader

__all__ = ["RefOwners", "response_ref_ids"]


def _skip(r: Reader) -> None:
    """Past one length-prefixed field without copying it (a result may be megabytes)."""
    n = r.take_usize()
    end = r.pos + n
    if end > len(r.buf):
        raise ValueError("truncated")
    r.pos = end


def response_ref_ids(payload: bytes) -> list[bytes]:
    """The ref ids (16 raw bytes each) in a ``SubWorkflowResponse``'s ``remote_refs``, skipping everything
    else without decoding it (no JSON, no strings built). A payload that does not parse has none."""
    try:
        r = Reader(payload)
        r.take_u32()
        for _ in range(r.take_usize()):  # state_json: (String, Vec<u8>) pairs
            _skip(r)
            _skip(r)
        if r.take_option_tag():  # result_json
            _skip(r)
        n = r.take_usize()
        ids = []
        for _ in range(n):
            ids.append(r.take_uuid())
            _skip(r)  # origin_node_id
            _skip(r)  # type_tag
            r.take_u64()  # created_at_epoch_ms
        return ids
    except ValueError:
        return []


class RefOwners:
    """ref id -> the address of the replica that holds it; the least recently seen go first beyond
    ``capacity`` (a forgotten ref is still found, by asking every replica)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._owners: OrderedDict[bytes, str] = OrderedDict()

    def remember(self, ids: list[bytes], addr: str) -> None:
        owners = self._owners
        for ref in ids:
            owners[ref] = addr
            owners.move_to_end(ref)
        while len(owners) > self.capacity:
            owners.popitem(last=False)

    def owner(self, ref: bytes) -> str | None:
        return self._owners.get(ref)

    def forget(self, ref: bytes) -> None:
        self._owners.pop(ref, None)

    def __len__(self) -> int:
        return len(self._owners)
