"""The suite's messages and client state as Flower records, and the bytes Flower really sends."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from torch import Tensor

from ilora.checkpoint import from_tensors, to_tensors


def to_array_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """A flat tensor message as an ArrayRecord (names kept, values bit for bit)."""
    record = ArrayRecord()
    for name, t in tensors.items():
        record[name] = Array(t.detach().to("cpu").contiguous().numpy())
    return record


def from_array_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return {name: torch.from_numpy(np.array(a.numpy())).to(device) for name, a in record.items()}


def state_records(state: Any, round_index: int) -> tuple[ArrayRecord, ConfigRecord]:
    """A client's state (nested dicts of tensors and values) as (tensors, skeleton and round)."""
    skeleton, tensors = to_tensors(state)
    return to_array_record(tensors), ConfigRecord({"skeleton": json.dumps(skeleton), "round": round_index})


def state_from_records(arrays: ArrayRecord, config: ConfigRecord, device: torch.device | str = "cpu") -> Any:
    return from_tensors(json.loads(str(config["skeleton"])), from_array_record(arrays), device)


def payload_bytes(record: ArrayRecord) -> int:
    """The tensors' own bytes (elements x element size): what the method's message is."""
    return sum(int(a.numpy().nbytes) for a in record.values())


def transmitted_bytes(message: Message) -> tuple[int, int]:
    """``(total, array data)`` bytes one hop of ``message`` moves (protobuf over HTTP, uncompressed; HTTP
    headers not counted): the message's envelope (its metadata and object tree) plus every object of
    the tree (message, records, arrays, array chunks) as pushed, identical objects once (so a message
    with several equal tensors, e.g. zero-initialised ``B``, carries their data once). ``array data``
    is the chunks' bodies (the tensors as ``.npy``); the rest is Flower's framing."""
    envelope = len(message_to_proto(remove_content_from_message(message)).SerializeToString())
    total, data = envelope + get_object_tree(message).ByteSize(), 0
    for obj in get_all_nested_objects(message).values():
        total += len(obj.deflate())
        if isinstance(obj, ArrayChunk):
            data += len(obj.data)
    return total, data
