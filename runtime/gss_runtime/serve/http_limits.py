"""The HTTP protocol gss-serve listens with: uvicorn's httptools protocol with the request head bounded in
bytes, header count and time (uvicorn's own has no bound on any of the three); h11 with its
incomplete-event limit where httptools is not installed.
"""
from __future__ import annotations

from .guard import HEAD_FRAMING_SLACK, GuardOptions, error_body


def uvicorn_settings(options: GuardOptions) -> dict:
    """uvicorn.Config keywords that bound the request head: its bytes, header count and time to arrive."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # h11: the head within h11_max_incomplete_event_size (a 400 past it); no count, no deadline
        return {"http": "h11", "h11_max_incomplete_event_size": options.max_header_bytes + HEAD_FRAMING_SLACK}
    return {"http": bounded_httptools_protocol(options)}


def bounded_httptools_protocol(options: GuardOptions) -> type:
    """uvicorn's httptools protocol, whose request head has no bound (a header of any size is read into
    memory), with three: the head's bytes (431; 414 for the URL alone), its header count (431), and its
    time to arrive from the connection or its first byte (408, or a silent close for a connection that has
    sent nothing). A request answered before its body has arrived (401, 413) has the rest of the body read
    and dropped, so the client can read the answer, for at most body_timeout: then the connection is closed."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._refusal: tuple[int, str, str] | None = None
            self._closed_by_us = False
            self._in_head, self._head_received = True, 0
            self._url_bytes = self._field_bytes = self._field_count = 0
            self._head_timer = self._linger_timer = None

        # a connection, and each request head, must arrive in time
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def connection_lost(self, exc):
            for timer in (self._head_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._linger_timer = None
            super().connection_lost(exc)

        def data_received(self, data):
            if self._closed_by_us:
                return
            if self._in_head:
                self._head_received += len(data)
            super().data_received(data)
            if not self._closed_by_us and self._in_head and self._head_received > options.max_header_bytes + HEAD_FRAMING_SLACK:
                self._answer_and_close(431, f"the request head is longer than {options.max_header_bytes} bytes "
                                            "(--max-header-bytes)", "request_header_fields_too_large")

        def on_message_begin(self):
            super().on_message_begin()
            self._in_head = True
            self._url_bytes = self._field_bytes = self._field_count = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def on_url(self, url):
            self._url_bytes += len(url)
            if self._url_bytes > options.max_header_bytes:
                self._stop(414, f"the URL is longer than {options.max_header_bytes} bytes (--max-header-bytes)", "uri_too_long")
            super().on_url(url)

        def on_header(self, name, value):
            self._field_count += 1
            self._field_bytes += len(name) + len(value)
            if self._field_count > options.max_headers:
                self._stop(431, f"more than {options.max_headers} header fields (--max-headers)", "request_header_fields_too_large")
            if self._url_bytes + self._field_bytes > options.max_header_bytes:
                self._stop(431, f"the URL and header fields are longer than {options.max_header_bytes} bytes "
                                "(--max-header-bytes)", "request_header_fields_too_large")
            super().on_header(name, value)

        def on_headers_complete(self):
            self._in_head, self._head_received = False, 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().on_headers_complete()

        def on_message_complete(self):
            super().on_message_complete()
            self._in_head, self._head_received = True, 0
            if self._linger_timer is not None:  # the body of an answered request is over: the connection goes on
                self._linger_timer.cancel()
                self._linger_timer = None
                # and waits for a next request, which uvicorn's keep-alive timer (cancelled by the body's bytes) no
                # longer bounds
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(options.header_timeout, self._head_timed_out)

        def on_response_complete(self):
            super().on_response_complete()
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                # answered before its body had all arrived (401, 413): uvicorn reads and drops the rest, for so long
                self._linger_timer = self.loop.call_later(options.body_timeout, self._linger_over)

        def _stop(self, status: int, message: str, code: str):
            # raised from a parser callback: httptools stops and uvicorn calls send_400_response, which answers this
            self._refusal = (status, message, code)
            raise ValueError(message)

        def send_400_response(self, msg: str):
            if self._refusal is None:
                return super().send_400_response(msg)
            self._answer_and_close(*self._refusal)

        def _head_timed_out(self):
            self._head_timer = None
            if self._closed_by_us or self.transport is None or self.transport.is_closing() or not self._in_head:
                return
            if self._head_received:  # part of a head: say why; a connection that sent nothing is just closed
                self._answer_and_close(408, f"the request head did not arrive within {options.header_timeout:g} s "
                                            "(--header-timeout)", "request_timeout")
            else:
                self._closed_by_us = True
                self.transport.close()

        def _linger_over(self):
            self._linger_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _answer_and_close(self, status: int, message: str, code: str):
            self._closed_by_us = True
            if self.transport.is_closing():
                return
            body = error_body(message, code)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n", body]
            self.transport.write(b"".join(head))
            self.transport.close()

    return BoundedHttpToolsProtocol
