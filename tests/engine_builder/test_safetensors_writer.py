"""The streaming safetensors writer/reader against the reference safetensors library."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.engine_builder.errors import CorruptSafetensorsError
from kiln.engine_builder.writer import StreamingSafetensorsWriter, TensorSpec, file_size, read_header, read_tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), (1, 1), (5, 3)][i]
        out[f"t{i}.{dtype}"] = (torch.randn(shape, generator=gen) * 50).to(dtype)
    return out


def test_round_trip_through_reference_loader(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(path, specs, {"format": "pt"})
    for name, t in tensors.items():
        if t.dim() >= 2 and t.shape[0] > 1:
            writer.write(name, t[:1], t[1:])  # row blocks are concatenated
        else:
            writer.write(name, t)
    writer.close()
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    raw = path.read_bytes()
    assert len(raw) == file_size(specs, {"format": "pt"}) == writer.bytes_written
    assert hashlib.sha256(raw).hexdigest() == writer.sha256
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}


def test_reader_reads_files_of_the_reference_writer(tmp_path):
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path))
    stored, _ = read_header(path)
    for name, t in tensors.items():
        assert torch.equal(read_tensor(path, stored[name]), t)
        if t.shape[0] > 2:
            assert torch.equal(read_tensor(path, stored[name], rows=(1, 3)), t[1:3])


def test_writer_enforces_order_shape_and_completeness(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2, 2)), TensorSpec("b", torch.float32, (3,))]
    writer = StreamingSafetensorsWriter(tmp_path / "w.safetensors", specs)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="rows"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="only 1 of 2"):
        writer.close()


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:4],  # shorter than the length prefix
        lambda raw: struct.pack("<Q", 10**12) + raw[8:],  # absurd header length
        lambda raw: raw[:8] + b"{not json" + raw[17:],
        lambda raw: raw[:-5],  # truncated data
    ],
    ids=["short", "huge-header", "bad-json", "truncated"],
)
def test_corrupt_files_are_reported(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptSafetensorsError):
        read_header(path)
