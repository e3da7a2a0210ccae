"""The mock's Batch API keeps its files on disk, not in memory (a run of 10^6 requests
would otherwise hold every batch file, output and error file in the server)."""

from __future__ import annotations

import aiohttp

from engine.batch.api import BatchApi
from engine.testing.mock_server import MockServer

LINES = b"".join(
    b'{"custom_id":"%d.a:x.0","method":"POST","url":"/v1/chat/completions",'
    b'"body":{"model":"mock","messages":[{"role":"user","content":"q %d"}]}}\n' % (i, i)
    for i in range(5)
)


async def test_uploaded_and_output_files_are_files_on_disk(mock: MockServer) -> None:
    async with aiohttp.ClientSession() as session:
        api = BatchApi(session, mock.base_url, None)
        file_id = await api.upload(LINES, "in.jsonl")
        assert mock.batch.files[file_id].read_bytes() == LINES
        batch = await api.create(file_id, "24h", {})
        batch = await api.get(str(batch["id"]))
        assert batch["status"] == "completed"
        output = mock.batch.files[batch["output_file_id"]]
        assert output.is_file() and output.parent == mock.batch.files[file_id].parent
        read = [line async for line in api.lines(batch["output_file_id"])]
        assert read == output.read_bytes().splitlines()
        assert len(read) == 5
