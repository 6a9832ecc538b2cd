"""A plain streamed choice's chunks, written from the engine's dispatch, not from its handler.

At saturation the one event loop writes a chunk per stream per engine step (256 streams: 256
chunks a step). Through the handler each chunk costs waking its task, the stream's iterator,
the handler's loop and aiohttp's writer coroutine; on the CPU VM's profile of the server at
saturation those layers took about half of the loop's time, the socket write the other half.
The sink does the same work in one call: the new text goes into the chunk's bytes, made once
per stream as a head and a tail around the text (the same bytes as the dict path in
stream_chunks.py: they are cut from its own output), framed as an HTTP chunk and handed to the
transport.

It takes only what needs no awaiting: outputs before the last, while the transport's buffer is
short and the connection open. Everything else (the final output, a client reading slowly, a
client gone) it declines, and the handler takes that output the usual way: aiohttp's write
waits for the buffer to drain, or raises the ConnectionError that ends the request. Both write
from the same loop and share the choice's ChoiceProgress, so chunks keep their order and no text
is sent twice.
"""

from __future__ import annotations

import orjson

from aserve.outputs import RequestOutput

# Over this many bytes waiting in the transport, the handler writes (and waits for the drain):
# aiohttp's own writer drains past 64 KiB too.
WRITE_BUFFER_LIMIT = 0x10000

# Stands for the text in a chunk body given to TextChunkSink (no id or model name holds it).
TEXT_MARK = "\x00aserve text\x00"


class ChoiceProgress:
    """How much of one choice has been streamed."""

    __slots__ = ("text_len", "num_tokens", "offset", "started", "done")

    def __init__(self):
        self.text_len = self.num_tokens = self.offset = 0
        self.started = self.done = False


def split_around_text(body_with_mark: dict) -> tuple[bytes, bytes]:
    """The SSE event of a chunk body whose text is TEXT_MARK, as the bytes before and after the
    text's JSON string."""
    event = b"data: " + orjson.dumps(body_with_mark) + b"\n\n"
    head, mark, tail = event.partition(orjson.dumps(TEXT_MARK))
    if not mark or orjson.dumps(TEXT_MARK) in tail:
        raise ValueError("the chunk's text mark must occur exactly once")
    return head, tail


class TextChunkSink:
    """Called with a stream's outputs on the loop (RequestStream.set_sink); returns whether it
    took the output (wrote its chunk, or found nothing new). body_with_mark: the chunk's body
    as stream_chunks builds it, with TEXT_MARK for the text, no finish reason."""

    def __init__(self, transport, chunked: bool, progress: ChoiceProgress, body_with_mark: dict):
        self._transport = transport
        self._chunked = chunked   # the response's transfer encoding: each write framed as a chunk
        self._progress = progress
        self._head, self._tail = split_around_text(body_with_mark)

    def __call__(self, output: RequestOutput) -> bool:
        transport = self._transport
        if (output.finished or transport is None or transport.is_closing()
                or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT):
            return False
        choice = output.outputs[0]
        progress = self._progress
        num_tokens = len(choice.token_ids)
        if num_tokens == progress.num_tokens:
            return True  # nothing new (an output the handler already sent)
        text = choice.text[progress.text_len:]
        progress.text_len, progress.num_tokens, progress.started = len(choice.text), num_tokens, True
        # A chunk even with no text (a token that is part of a character): clients that count
        # chunks as tokens count right, as with vLLM.
        event = self._head + orjson.dumps(text) + self._tail
        transport.write(b"%x\r\n%b\r\n" % (len(event), event) if self._chunked else event)
        return True
